"""GPU benchmark of dynamic shallow layers: time to first token of the Llama-3.1-8B architecture
(random bf16 weights) with dense vs TriangleMix vs dynamic-shallow + TriangleMix, and the attention
time of one layer (dynamic, estimation included, vs SDPA dense) in the same table.

Random weights give diffuse, position-free attention, so the estimated columns and bands are
scattered: the vertical-slash kernel then meets its worst case (each band costs two tiles a query
block), which is what these numbers show. Run on an H100 and an H200 (docs/performance.md); other GPUs not
run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import TRIANGLE, DynamicSpec, ModelIdentity, TriMixConfig
from ..reference import masked_attention
from ..tasks import parse_lengths
from .common import env, heads_of, need_cuda, random_model, time_ms, write


def _layer_times(seq: int, spec: DynamicSpec, device) -> dict:
    """Attention of one Llama-3.1-8B layer (32 q / 8 kv heads, head_dim 128, bf16) on random inputs:
    SDPA dense causal, dynamic_attention as the runtime calls it, and its parts. Checks the sparse
    kernel against the torch reference on the heads of one kv head first."""
    from ..dynamic import dense_above_limit, dynamic_attention, select_vertical_slash, vertical_slash_mask_fn, work_share
    from ..kernels.vertical_slash import vertical_slash_attention, vertical_slash_indices

    h, hk, d = heads_of("llama-3.1-8b").values()
    g = torch.Generator(device=device).manual_seed(seq + 1)
    q = torch.randn(1, h, seq, d, generator=g, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(1, hk, seq, d, generator=g, device=device, dtype=torch.bfloat16) for _ in range(2))
    sel = select_vertical_slash(q, k, spec)
    sparse = lambda: vertical_slash_attention(q, k, v, sel.columns, sel.bands, block_size=spec.block_size)  # noqa: E731
    rel = _check_against_reference("vertical-slash", sparse(), q, k, v,
                                   lambda head: vertical_slash_mask_fn(sel, 0, head, seq))
    # share of the causal block_size x block_size tiles that meet the selection (a chunk of block_size
    # columns counts as one tile; the kernel's own tiles may be smaller, see vertical_slash.default_tile)
    _, tile_cnt, _, _, col_cnt = vertical_slash_indices(sel.columns, sel.bands, seq, spec.block_size)
    n_q = tile_cnt.shape[1]
    visited = (tile_cnt.sum().item() + col_cnt.sum().item() / spec.block_size) / h
    row = {"seq": seq, "rel_err_vs_ref": rel, "work_share_bound": work_share(spec, seq),
           "tile_share": visited / (n_q * (n_q + 1) / 2),
           "sdpa_ms": time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
           "sdpa_cudnn_ms": time_ms(lambda: _cudnn(q, k, v)),
           "dynamic_ms": time_ms(lambda: dynamic_attention(q, k, v, spec)),
           "select_ms": time_ms(lambda: select_vertical_slash(q, k, spec)),
           **_estimate_times(q, k, spec),
           "sparse_kernel_ms": time_ms(sparse)}
    row["dynamic_runs"] = "dense (fallback)" if row["work_share_bound"] > dense_above_limit() else "sparse"
    row.update(_blockwise_times(q, k, v, spec.block_size, row["tile_share"]))
    return row


def _estimate_times(q, k, spec: DynamicSpec) -> dict:
    """The vertical-slash estimate's scores: the fused kernel against the torch reference (the anchor),
    both timed, and their largest difference (the scores are sums of probabilities, up to last_q)."""
    from ..dynamic import vertical_slash_scores_ref
    from ..kernels.vertical_slash_estimate import vertical_slash_scores

    last_q, block, scale = min(spec.last_q, q.shape[2]), spec.block_size, q.shape[-1] ** -0.5
    fused = lambda: vertical_slash_scores(q, k, last_q=last_q, block_size=block, scale=scale)  # noqa: E731
    ref = lambda: vertical_slash_scores_ref(q, k, last_q, block, scale)  # noqa: E731
    diff = max((a - b).abs().max().item() for a, b in zip(fused(), ref()))
    if not diff < 1e-3:
        raise RuntimeError(f"seq {q.shape[2]}: the estimate kernel and its reference disagree (max diff {diff:.2e})")
    return {"estimate_scores_ms": time_ms(fused), "estimate_scores_ref_ms": time_ms(ref), "estimate_max_diff": diff}


def transfer_plan(config: TriMixConfig, target: ModelIdentity, seq: int) -> TriMixConfig:
    """``config``'s plan laid onto another model by depth: target layer ``i`` takes the kind, budget
    and dense-head share of source layer ``i * L_src // L_tgt``; dense heads map by index
    (``h * H_tgt // H_src``). Vertical-slash budgets scale by ``seq`` over the longest probed prompt
    (the probe's ladder is a share of it), when the config records the probed lengths. This keeps the
    plan's shares of sparse work, not its exact kept set: the benchmark of a real model's plan on
    the random-weight architecture."""
    ls, lt, hs, ht = config.model.num_layers, target.num_layers, config.model.num_heads, target.num_heads
    src = [i * ls // lt for i in range(lt)]
    probed = config.provenance.get("probed_lengths") or []  # the prompts' lengths; the ladder scales to the longest
    factor = seq / max(probed) if probed else 1.0

    def spec_of(layer: int) -> DynamicSpec:
        spec = config.dynamic_spec(layer)
        if spec.method != "vertical_slash" or factor == 1.0:
            return spec
        return replace(spec, vertical=max(1, round(spec.vertical * factor)), slash=max(1, round(spec.slash * factor)))

    layers = tuple(config.layers[s] for s in src)
    dense_heads = {i: tuple(sorted({h * ht // hs for h in config.dense_heads[s]}))
                   for i, s in enumerate(src) if config.dense_heads.get(s)}
    dyn = {i: spec_of(s) for i, s in enumerate(src) if layers[i] == "dynamic"}
    common = next(iter(dyn.values()), None)
    starting = next((i for i, kind in enumerate(layers) if kind == "triangle"), None)
    return TriMixConfig(model=target, layers=layers, n_init=config.n_init, n_local=config.n_local,
                        last_n=config.last_n, starting_layer=starting, dense_heads=dense_heads, dynamic=common,
                        dynamic_layers={i: sp for i, sp in dyn.items() if sp != common},
                        provenance={"method": "transferred", "from": config.model.name})


def _check_against_reference(kernel: str, out, q, k, v, mask_of_head) -> float:
    """A kernel's output against the torch reference on the last 1024 rows (the heaviest) of the
    heads of kv head 0; raises on a mismatch. Returns the last head's relative error."""
    seq, group = q.shape[2], q.shape[1] // k.shape[1]
    for head in range(group):
        ref, _ = masked_attention(q[:, head:head + 1, -1024:], k[:, :1], v[:, :1], mask_of_head(head))
        rel = ((out[:, head, -1024:].float() - ref[:, 0].float()).norm() / ref.float().norm()).item()
        if not rel < 2e-2:
            raise RuntimeError(f"seq {seq}, head {head}: {kernel} kernel and reference disagree (rel err {rel:.2e})")
    return rel


def _blockwise_times(q, k, v, block_size: int, share: float) -> dict:
    """The blockwise kernel on a random block pattern keeping about ``share`` of the causal tiles (the
    vertical-slash kernel's share, so the two kernels compare at equal work; block 0 and the diagonal
    always), checked against the torch reference first; and FlexPrefill-style estimation
    (``select_blockwise``, gamma 0.9). Random weights make real blockwise patterns near dense, so the
    kernel is timed on a pattern of chosen density instead."""
    from ..dynamic import blockwise_mask_fn, select_blockwise
    from ..kernels.blockwise import blockwise_attention

    h, seq = q.shape[1], q.shape[2]
    n = -(-seq // block_size)
    g = torch.Generator(device=q.device).manual_seed(seq + 2)
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    keep = torch.rand(1, h, n, n, generator=g, device=q.device) < share
    keep |= torch.eye(n, dtype=torch.bool, device=q.device)
    keep[..., 0] = True
    keep &= causal
    run = lambda: blockwise_attention(q, k, v, keep, block_size=block_size)  # noqa: E731
    rel = _check_against_reference("blockwise", run(), q, k, v,
                                   lambda head: blockwise_mask_fn(keep, 0, head, block_size))
    spec = DynamicSpec(method="blockwise", gamma=0.9, block_size=block_size)
    return {"bw_tile_share": keep.sum().item() / (h * n * (n + 1) / 2), "bw_rel_err_vs_ref": rel,
            "bw_select_ms": time_ms(lambda: select_blockwise(q, k, spec)), "bw_kernel_ms": time_ms(run)}


def _cudnn(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def bench_dynamic(seqs: str | tuple[int, ...] = "32k,64k,128k", runs: int = 1, out_dir: Path = Path("bench-out"),
                  starting_layer: int = 16, vertical: int = 1000, slash: int = 6096, block_size: int = 128,
                  last_q: int = 64, dense_last: int = TRIANGLE.last_n, config: Path | str | None = None) -> str:
    """TTFT (prefill, logits of the last token) of the Llama-3.1-8B architecture with random bf16
    weights: dense vs TriangleMix from ``starting_layer`` vs vertical-slash below it + TriangleMix;
    and one layer's attention time (dynamic vs SDPA dense). ``runs`` timed runs after one warm-up,
    median. ``dense_last``: the last rows of the dynamic layers run dense (as ``analyze`` writes them;
    "layer: dynamic as run" includes them, "sparse kernel" does not). ``config``: a config ``analyze``
    emitted for a real model, laid onto this architecture by :func:`transfer_plan` and timed beside
    the others, with its triangle-only twin (its dynamic layers dense). Returns the table."""
    from ..patch import patch_model, unpatch_model

    source = TriMixConfig.load(config) if config is not None else None  # a bad file fails before the GPU work
    device, seqs = need_cuda(), parse_lengths(seqs, "--seqs")
    info = env(device)
    spec = DynamicSpec(method="vertical_slash", vertical=vertical, slash=slash, block_size=block_size, last_q=last_q,
                       dense_last=dense_last)
    layers = [_layer_times(seq, spec, device) for seq in seqs]
    torch.cuda.empty_cache()
    model = random_model("llama-3.1-8b", device, torch.bfloat16)
    identity = ModelIdentity.from_hf_config(model.config, name="Llama-3.1-8B (random)")
    plans = {"trimix": TriMixConfig.triangle_from(identity, starting_layer),
             "dynamic": TriMixConfig.triangle_from(identity, starting_layer, shallow="dynamic", dynamic=spec)}

    def timed(ids) -> list[float]:
        times = []
        for _ in range(runs + 1):  # the first is the warm-up (autotune, cuDNN plans)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode():
                model(ids, logits_to_keep=1, use_cache=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return times[1:]

    def plans_at(seq: int) -> dict[str, TriMixConfig]:
        if source is None:
            return plans
        mapped = transfer_plan(source, identity, seq)
        twin = TriMixConfig.triangle_from(identity, mapped.starting_layer if mapped.starting_layer is not None
                                          else identity.num_layers,
                                          dense_heads={i: h for i, h in mapped.dense_heads.items()
                                                       if mapped.layers[i] == "triangle"})
        return plans | {"config": mapped, "config_triangle": twin}

    rows = []
    for seq, layer in zip(seqs, layers):
        ids = torch.randint(0, model.config.vocab_size, (1, seq), device=device,
                            generator=torch.Generator(device=device).manual_seed(seq))
        row = dict(layer)
        unpatch_model(model)
        row["dense_s"] = timed(ids)
        at = plans_at(seq)
        if source is not None:
            row["config_layers"] = list(at["config"].layers)
            row["config_starting_layer"] = at["config"].starting_layer
        for name, plan in at.items():
            patch_model(model, plan)
            row[f"{name}_s"] = timed(ids)
            unpatch_model(model)
        rows.append(row)
        print(f"seq {seq}: " + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in row.items()
                                         if k.endswith("_s")), flush=True)
        torch.cuda.empty_cache()
    head = (f"Dynamic shallow layers: TTFT of the Llama-3.1-8B architecture (random bf16 weights), batch 1, logits "
            f"of the last token; TriangleMix from layer {starting_layer} (n_init={plans['trimix'].n_init}, "
            f"n_local={plans['trimix'].n_local}, last_n={plans['trimix'].last_n}); "
            f"dynamic = vertical-slash in layers 0-{starting_layer - 1} (vertical={vertical}, slash={slash}, "
            f"block_size={block_size}, last_q={last_q}, dense_last={dense_last}) + the same triangle layers; "
            f"{info['card']}, {info['date']}; "
            f"torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}; TTFT in s "
            f"(median of {runs} after a warm-up), layer times in ms (do_bench median, one layer, random q/k/v); "
            f"blockwise: FlexPrefill-style estimate (gamma 0.9) and the blockwise kernel on a random block "
            f"pattern of about the vertical-slash kernel's tile share")
    lines = [head, "",
             "| seq | dense | TriangleMix | dynamic + TriangleMix | vs dense | vs TriangleMix "
             "| layer: SDPA dense (default / cuDNN) | layer: dynamic as run | estimate | sparse kernel | tiles kept | runs "
             "| blockwise: estimate | blockwise kernel (tiles kept) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        dense, tm, dyn = (statistics.median(r[k]) for k in ("dense_s", "trimix_s", "dynamic_s"))
        lines.append(f"| {r['seq'] // 1024}K | {dense:.2f} | {tm:.2f} | {dyn:.2f} | {100 * (dyn / dense - 1):+.0f}% "
                     f"| {100 * (dyn / tm - 1):+.0f}% | {r['sdpa_ms']:.1f} / {r['sdpa_cudnn_ms']:.1f} | {r['dynamic_ms']:.1f} "
                     f"| {r['select_ms']:.1f} | {r['sparse_kernel_ms']:.1f} | {100 * r['tile_share']:.0f}% "
                     f"| {r['dynamic_runs']} | {r['bw_select_ms']:.1f} "
                     f"| {r['bw_kernel_ms']:.1f} ({100 * r['bw_tile_share']:.0f}%) |")
    if source is not None:
        lines += ["", f"The config {str(config)!r} ({source.model.name}, layers {source.model.num_layers}) laid onto "
                  "this architecture by depth (`transfer_plan`): its dynamic layers, budgets scaled to the length, "
                  "dense heads by index; `config (triangle only)` is its twin with dense shallow layers.", "",
                  "| seq | dense | config (triangle only) | config | vs dense | vs triangle only | starting layer "
                  "| dynamic layers |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            dense, tri, cfg = (statistics.median(r[k]) for k in ("dense_s", "config_triangle_s", "config_s"))
            dyn = [i for i, kind in enumerate(r["config_layers"]) if kind == "dynamic"]
            lines.append(f"| {r['seq'] // 1024}K | {dense:.2f} | {tri:.2f} | {cfg:.2f} | {100 * (cfg / dense - 1):+.0f}% "
                         f"| {100 * (cfg / tri - 1):+.0f}% | {r['config_starting_layer']} | {dyn or 'none'} |")
    lines += ["", "| seq | estimate scores: fused kernel | torch reference | max diff |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['seq'] // 1024}K | {r['estimate_scores_ms']:.2f} | {r['estimate_scores_ref_ms']:.2f} "
              f"| {r['estimate_max_diff']:.1e} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    write(Path(out_dir), "bench-dynamic", table, {"env": info, "spec": spec.__dict__, "rows": rows, "runs": runs})
    return table
