"""Where the probe's memory goes: one sample per length through the gradient probe on the Llama-3.1-8B
architecture (random bf16 weights built on the device, nothing downloaded), with the CUDA peak per
phase (weights, block masks, forward, backward) and, per decoder layer, the peak between one
layer's attention call (first pass, then its recompute in the backward) and the next event.

    python scripts/probe_memory.py --lengths 32k,64k,128k --out $OUT/probe-memory

Writes OUT.json (every number) and OUT.txt (a table). Runs on main and on a branch alike (it uses
only ``probing``/``probe_sample``/``_block_masks``), so the two can be compared. A length that runs
out of memory is reported as such and the next one still runs. ``--arch tiny`` is a 2-layer dry
run (CPU: times only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

GB = 2**30


def llama_config(arch: str):
    from transformers import LlamaConfig

    if arch == "tiny":
        return LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072)
    # Llama-3.1-8B's config.json (as bench probe builds it)
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


class Meter:
    """Peak CUDA memory since the last mark, by name."""

    def __init__(self, dev):
        self.dev, self.cuda = dev, dev.type == "cuda"

    def now(self) -> float:
        return torch.cuda.memory_allocated(self.dev) / GB if self.cuda else 0.0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)

    def peak(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.dev)
            return torch.cuda.max_memory_allocated(self.dev) / GB
        return 0.0


def one_length(lm, gates, cfg, seq: int, answer: int, meter: Meter) -> dict:
    from transformers.modeling_layers import GradientCheckpointingLayer

    from trimix_probe import probe

    n_prompt = seq - answer
    row: dict = {"seq": seq}
    spec = probe.SectionSpec(n_prompt, answer, 8, 512, 128)
    meter.reset()
    t0 = time.perf_counter()
    if probe.resolve_backend("auto", meter.dev) == "flex":
        probe._block_masks(spec, meter.dev)  # cached: probe_sample reuses them
    row["masks_s"] = round(time.perf_counter() - t0, 2)
    row["masks_peak_gb"] = round(meter.peak(), 2)
    row["before_gb"] = round(meter.now(), 2)

    events = []  # (phase, layer, allocated at the layer's forward, peak since the previous event)
    calls = {}

    def pre(module, args, idx):
        calls[idx] = calls.get(idx, 0) + 1
        events.append(("forward" if calls[idx] == 1 else "backward", idx, round(meter.now(), 2), round(meter.peak(), 2)))
        meter.reset()

    layers = [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)]
    # on the attention inside each layer: transformers keeps the layer's own hooks outside the checkpoint,
    # so only a submodule's hook also fires when the backward recomputes the layer
    handles = [m.self_attn.register_forward_pre_hook(lambda mod, a, i=i: pre(mod, a, i)) for i, m in enumerate(layers)]
    ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    meter.reset()
    t0 = time.perf_counter()
    try:
        g = probe.probe_sample(lm, gates, ids, n_prompt, objective="answer")
        row["finite_grads"] = bool(torch.isfinite(g).all())
    finally:
        for h in handles:
            h.remove()
    row["probe_s"] = round(time.perf_counter() - t0, 2)
    events.append(("end", -1, round(meter.now(), 2), round(meter.peak(), 2)))
    # the peak between two events belongs to the earlier one
    per = [{"phase": p, "layer": i, "allocated_gb": a, "peak_until_next_gb": events[j + 1][3]}
           for j, (p, i, a, _) in enumerate(events[:-1])]
    row["layers"] = per
    fwd = [e for e in per if e["phase"] == "forward"]
    bwd = [e for e in per if e["phase"] == "backward"]
    row["forward_peak_gb"] = max((e["peak_until_next_gb"] for e in fwd), default=None)
    row["backward_peak_gb"] = max((e["peak_until_next_gb"] for e in bwd), default=None)
    row["saved_after_forward_gb"] = fwd[-1]["allocated_gb"] if fwd else None  # weights + checkpointed inputs
    row["peak_gb"] = max(e[3] for e in events[1:])
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="32k,64k", help="comma list, k = 1024")
    ap.add_argument("--answer", type=int, default=16)
    ap.add_argument("--arch", default="llama-3.1-8b", choices=["llama-3.1-8b", "tiny"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="probe-memory")
    args = ap.parse_args(argv)

    from transformers import LlamaForCausalLM

    from trimix_probe import probe

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lengths = [int(float(x[:-1]) * 1024) if x.lower().endswith("k") else int(x) for x in args.lengths.split(",")]
    cfg = llama_config(args.arch)
    meter = Meter(dev)
    t0 = time.perf_counter()
    with torch.device(dev):
        lm = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    lm.eval()
    result = {"arch": args.arch, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "torch": torch.__version__, "build_s": round(time.perf_counter() - t0, 1),
              "weights_gb": round(meter.now(), 2), "lengths": []}
    with probe.probing(lm, "auto", True) as gates:
        for seq in lengths:
            try:
                row = one_length(lm, gates, cfg, seq, args.answer, meter)
            except torch.OutOfMemoryError as err:
                row = {"seq": seq, "error": f"out of memory: {str(err).splitlines()[0]}"}
            probe._block_masks.cache_clear()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            result["lengths"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "layers"}), file=sys.stderr)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"{result['arch']} on {result['device']}, torch {result['torch']}, weights {result['weights_gb']} GB",
             "| seq | masks GB (s) | after forward GB | forward peak GB | backward peak GB | peak GB | probe s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["lengths"]:
        if "error" in r:
            lines.append(f"| {r['seq']} | {r['error']} |||||")
            continue
        lines.append(f"| {r['seq']} | {r['masks_peak_gb']} ({r['masks_s']}) | {r['saved_after_forward_gb']} | "
                     f"{r['forward_peak_gb']} | {r['backward_peak_gb']} | {r['peak_gb']} | {r['probe_s']} |")
    for r in result["lengths"]:
        if "layers" in r:
            lines.append(f"\nseq {r['seq']}, per layer (phase layer: allocated at its forward -> peak until the next):")
            lines += [f"  {e['phase']:8s} {e['layer']:2d}: {e['allocated_gb']:7.2f} -> {e['peak_until_next_gb']:7.2f}"
                      for e in r["layers"]]
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:3 + len(result["lengths"])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
