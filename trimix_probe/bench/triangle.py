"""GPU benchmarks (not timed tests): the triangle kernel against dense SDPA and FlexAttention, and
time to first token of the Llama-3.1-8B architecture with random weights (nothing downloaded).

Each prints a markdown table and writes it, with the raw numbers as JSON, to ``out_dir``.
Run on an H100 and an H200 (see docs/performance.md); other GPUs not run.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from .. import ops
from ..config import TRIANGLE
from ..reference import triangle_mask_fn
from ..tasks import parse_lengths
from .common import env, heads_of, need_cuda, random_model, seq_label, time_ms, write


def triangle_pairs(seq: int, n_init: int, n_local: int, last_n: int) -> int:
    """Number of (q_idx, kv_idx) pairs the triangle keeps (exact, for the FLOP floor)."""
    i = torch.arange(seq, dtype=torch.int64)
    local = torch.minimum(i + 1, torch.tensor(n_local))
    init = torch.clamp(torch.minimum(torch.tensor(n_init), i + 1 - local), min=0)  # sinks left of the window
    kept = torch.where(i >= seq - last_n, i + 1, local + init)
    return int(kept.sum())


def _peak_matmul_tflops(device) -> float:
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / (time_ms(lambda: a @ b) * 1e-3) / 1e12


def bench_kernel(seqs: str | tuple[int, ...] = "32k,64k,128k", out_dir: Path = Path("bench-out"),
                 n_init: int = TRIANGLE.n_init, n_local: int = TRIANGLE.n_local,
                 last_n: int = TRIANGLE.last_n) -> str:
    """Triangle kernel vs SDPA dense causal (flash, cuDNN) vs FlexAttention (same mask) vs the FLOP
    floor, Llama-3.1-8B heads (32 q, 8 kv, head_dim 128), bf16, batch 1. Returns the table."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    device, seqs = need_cuda(), parse_lengths(seqs, "--seqs")
    h, hk, d = heads_of("llama-3.1-8b").values()
    info = env(device)
    peak = _peak_matmul_tflops(device)
    shape = dict(n_init=n_init, n_local=n_local, last_n=last_n)
    rows = []
    for seq in seqs:
        g = torch.Generator(device=device).manual_seed(seq)
        q = torch.randn(1, h, seq, d, generator=g, device=device, dtype=torch.bfloat16)
        k, v = (torch.randn(1, hk, seq, d, generator=g, device=device, dtype=torch.bfloat16) for _ in range(2))
        ours = lambda: ops.triangle_triton(q, k, v, **shape)  # noqa: E731
        a = ours()
        fn = triangle_mask_fn(seq, n_init, n_local, last_n)
        build = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            create_block_mask(lambda b, hh, qi, ki: fn(qi, ki), None, None, seq, seq, device=device, _compile=True)
            torch.cuda.synchronize()
            build.append((time.perf_counter() - t0) * 1e3)
        b = ops.triangle_flex(q, k, v, **shape)
        rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
        if not rel < 2e-2:
            raise RuntimeError(f"seq {seq}: triangle kernel and FlexAttention disagree (rel err {rel:.2e})")
        row = {"seq": seq, "rel_err_vs_flex": rel, "flex_mask_build_ms_first": build[0],
               "flex_mask_build_ms": statistics.median(build[1:])}
        row["ours_ms"] = time_ms(ours)
        row["flex_ms"] = time_ms(lambda: ops.triangle_flex(q, k, v, **shape))
        for name, backend in (("sdpa_flash_ms", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn_ms", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel([backend]):
                    row[name] = time_ms(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True))
            except RuntimeError as err:  # backend refuses GQA here: time it on expanded K/V (copy not timed)
                ke, ve = (t.repeat_interleave(h // hk, dim=1) for t in (k, v))
                with sdpa_kernel([backend]):
                    row[name] = time_ms(lambda: sdpa(q, ke, ve, is_causal=True))
                row[name + "_note"] = f"enable_gqa refused ({str(err).splitlines()[0][:80]}); K/V expanded"
                del ke, ve
        flops = 4 * d * h * triangle_pairs(seq, n_init, n_local, last_n)
        row["useful_tflop"] = flops / 1e12
        row["floor_ms"] = flops / (peak * 1e12) * 1e3
        row["ours_tflops"] = flops / (row["ours_ms"] * 1e-3) / 1e12
        rows.append(row)
        del q, k, v, a, b
        torch.cuda.empty_cache()
    head = (f"Triangle kernel, Llama-3.1-8B heads (32 q / 8 kv, head_dim 128), bf16, batch 1, "
            f"n_init={n_init}, n_local={n_local}, last_n={last_n}; {info['card']}, {info['date']}; "
            f"torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}; "
            f"measured bf16 matmul peak {peak:.0f} TFLOP/s; median ms (triton.testing.do_bench)")
    lines = [head, "",
             "| seq | ours | FlexAttention | flex block mask (build) | SDPA flash (dense) | SDPA cuDNN (dense) "
             "| FLOP floor | ours / floor | flex / ours | cuDNN / ours | ours TFLOP/s | rel err vs flex |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {seq_label(r['seq'])} | {r['ours_ms']:.3f} | {r['flex_ms']:.3f} | {r['flex_mask_build_ms']:.2f} "
                     f"| {r['sdpa_flash_ms']:.2f} | {r['sdpa_cudnn_ms']:.2f} | {r['floor_ms']:.3f} "
                     f"| {r['ours_ms'] / r['floor_ms']:.2f}x | {r['flex_ms'] / r['ours_ms']:.2f}x "
                     f"| {r['sdpa_cudnn_ms'] / r['ours_ms']:.0f}x | {r['ours_tflops']:.0f} | {r['rel_err_vs_flex']:.1e} |")
    notes = [r[k] for r in rows for k in r if k.endswith("_note")]
    table = "\n".join(lines + ([""] + [f"note: {n}" for n in sorted(set(notes))] if notes else []))
    print(table)
    write(Path(out_dir), "bench-kernel", table, {"env": info, "peak_tflops": peak, "rows": rows})
    return table


def bench_ttft(seqs: str | tuple[int, ...] = "4k,32k,64k,128k", runs: int = 3,
               out_dir: Path = Path("bench-out"), starting_layer: int = 16) -> str:
    """Time to first token (prefill, logits of the last token only) of the Llama-3.1-8B
    architecture with random bf16 weights: dense SDPA vs TriangleMix from ``starting_layer`` vs the
    same plan with FlexAttention in the deep layers. Median of ``runs`` after one warm-up (at least 5
    runs for prompts up to 8K, where the 2% target needs them)."""
    from ..config import ModelIdentity, TriMixConfig
    from ..patch import patch_model, unpatch_model

    device, seqs = need_cuda(), parse_lengths(seqs, "--seqs")
    info = env(device)
    model = random_model("llama-3.1-8b", device, torch.bfloat16)
    config = TriMixConfig.triangle_from(ModelIdentity.from_hf_config(model.config, name="Llama-3.1-8B (random)"),
                                        starting_layer)
    def prefill(ids):
        with torch.inference_mode():
            return model(ids, logits_to_keep=1, use_cache=True).logits

    def timed(ids, setup=lambda: None) -> list[float]:
        times = []
        for i in range(1 + (runs if ids.shape[1] > 8192 else max(runs, 5))):
            setup()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            prefill(ids)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return times[1:]  # the first is the warm-up (autotune, torch.compile)

    rows = []
    for seq in seqs:
        ids = torch.randint(0, model.config.vocab_size, (1, seq), device=device,
                            generator=torch.Generator(device=device).manual_seed(seq))
        row = {"seq": seq}
        unpatch_model(model)
        row["dense_s"] = timed(ids)
        patch_model(model, config)
        row["trimix_s"] = timed(ids)
        unpatch_model(model)
        patch_model(model, config, impl="flex")
        row["flex_s"] = timed(ids, setup=ops.clear_flex_masks)  # block mask built once per prompt, timed
        unpatch_model(model)
        rows.append(row)
        print(f"seq {seq}: " + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in row.items() if k != "seq"),
              flush=True)
        write(Path(out_dir), "bench-ttft", "(partial)", {"env": info, "rows": rows, "runs": runs})
        torch.cuda.empty_cache()
    head = (f"TTFT, Llama-3.1-8B architecture (random bf16 weights), batch 1, logits of the last token; "
            f"TriangleMix from layer {starting_layer} (n_init={config.n_init}, n_local={config.n_local}, "
            f"last_n={config.last_n}); {info['card']}, {info['date']}; torch {info['torch']}, "
            f"transformers {info['transformers']}; median of {runs} runs after a warm-up, seconds")
    lines = [head, "", "| seq | dense (SDPA) | TriangleMix (ours) | TriangleMix (FlexAttention) | ours vs dense "
             "| ours vs flex plan |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        dense, ours, fl = (statistics.median(r[k]) for k in ("dense_s", "trimix_s", "flex_s"))
        lines.append(f"| {seq_label(r['seq'])} | {dense:.3f} | {ours:.3f} | {fl:.3f} | {100 * (ours / dense - 1):+.1f}% "
                     f"| {100 * (ours / fl - 1):+.1f}% |")
    table = "\n".join(lines)
    print(table)
    write(Path(out_dir), "bench-ttft", table, {"env": info, "rows": rows, "runs": runs})
    return table
