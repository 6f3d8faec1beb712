"""The probe's cost: wall time and peak memory of the gradient probe on a random-weight model of a
named architecture (synthetic token ids, no tokenizer, nothing downloaded)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..models import device_name, resolve_device, resolve_dtype
from ..probe import Backend, probe_sample, probing, resolve_backend
from .common import llama_config, random_model


def bench_probe(seq: int = 16384, samples: int = 8, answer: int = 16, arch: str = "llama-3.1-8b",
                device: str | None = None, dtype: str = "bfloat16", backend: Backend = "auto",
                out: Path | str | None = None, device_map: str | None = None, offload: bool | None = None) -> dict:
    """Cost of the probe: ``samples`` sequences of ``seq`` tokens (the last ``answer`` are the
    answer) through a random-weight model of ``arch``; wall time and peak memory. Synthetic token
    ids, no tokenizer, nothing downloaded. ``arch``: a key of :data:`~trimix_probe.bench.common.ARCHS`
    (``tiny`` is a 2-layer dry run for CPU). ``device_map="auto"``: the model is split by accelerate
    over the visible devices (``device`` is then where the first layers land). ``offload``: the
    checkpointed layer inputs wait in host memory (:func:`~trimix_probe.probe.offloaded_checkpoint`;
    default: when they would take more than 5% of the accelerator's memory)."""
    cfg = llama_config(arch)  # checks arch first
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    t0 = time.perf_counter()
    lm = random_model(arch, dev, dt, device_map=device_map)
    if device_map is not None:
        dev = lm.device
    build_s = time.perf_counter() - t0
    cards = sorted({p.device for p in lm.parameters() if p.device.type == "cuda"}, key=str)
    for card in cards:
        torch.cuda.synchronize(card)
        torch.cuda.reset_peak_memory_stats(card)
    n_prompt = seq - answer
    gen = torch.Generator().manual_seed(0)
    times = []
    with probing(lm, backend, offload=offload) as gates:
        for _ in range(samples):
            ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=gen)
            t1 = time.perf_counter()
            g = probe_sample(lm, gates, ids, n_prompt, objective="answer")
            for card in cards:
                torch.cuda.synchronize(card)
            times.append(time.perf_counter() - t1)
    result = {"arch": arch, "device": device_name(lm), "dtype": str(dt), "backend": resolve_backend(backend, dev),
              "seq": seq, "answer": answer, "samples": samples, "build_s": round(build_s, 1),
              "probe_s": round(sum(times), 2), "first_sample_s": round(times[0], 2),
              "later_sample_s": round(float(np.mean(times[1:])), 2) if len(times) > 1 else None,
              "finite_grads": bool(torch.isfinite(g).all()), "torch": torch.__version__,
              "offload": "auto" if offload is None else offload}
    if cards:  # split over several cards: the peak of each, in order
        peaks = [(torch.cuda.max_memory_allocated(c) / 2**30, torch.cuda.max_memory_reserved(c) / 2**30) for c in cards]
        result["peak_allocated_gb"] = round(peaks[0][0], 2) if len(cards) == 1 else [round(a, 2) for a, _ in peaks]
        result["peak_reserved_gb"] = round(peaks[0][1], 2) if len(cards) == 1 else [round(r, 2) for _, r in peaks]
    else:
        import resource

        result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result
