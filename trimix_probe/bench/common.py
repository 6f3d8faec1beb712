"""What the benchmarks share: a GPU check, timing, the environment line, result files, and the
named architectures they build with random weights (nothing downloaded)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:  # torch loads inside the functions, so the CLI can read ARCHS without it
    import torch

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
ARCHS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                         rope_scaling=_LLAMA3_ROPE),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                          rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                          rope_scaling=_LLAMA3_ROPE),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}
"""Llama architectures by name (``LlamaConfig`` keywords); ``tiny`` is a 2-layer dry run for CPU."""


def heads_of(arch: str) -> dict[str, int]:
    """``{"heads", "kv_heads", "head_dim"}`` of one attention layer of ``arch``."""
    a = ARCHS[arch]
    return {"heads": a["num_attention_heads"], "kv_heads": a["num_key_value_heads"],
            "head_dim": a["hidden_size"] // a["num_attention_heads"]}


def llama_config(arch: str):
    """The ``LlamaConfig`` of a named architecture (InputError for an unknown name)."""
    from transformers import LlamaConfig

    if arch not in ARCHS:
        raise InputError(f"arch {arch!r} is not known; accepted: {', '.join(ARCHS)}")
    return LlamaConfig(**ARCHS[arch])


def random_model(arch: str, device: torch.device | None, dtype: torch.dtype, device_map: str | None = None):
    """A ``LlamaForCausalLM`` of ``arch`` with random weights, in eval mode, SDPA attention: built
    directly on ``device``, or with ``device_map="auto"`` split by accelerate over the visible
    devices (built empty, each weight drawn on the device it is placed on, then dispatched)."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(arch)
    if device_map is None:
        with torch.device(device):
            model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
        return model.eval()
    if device_map != "auto":
        raise InputError(f"device_map {device_map!r} is not accepted here; accepted: auto")
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory, set_module_tensor_to_device

    with init_empty_weights():
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    # balanced, as from_pretrained's "auto": filling the first GPU with weights would leave it no room
    # for the activations of its layers
    split = dict(no_split_module_classes=model._no_split_modules, dtype=dtype)
    placed = infer_auto_device_map(model, max_memory=get_balanced_memory(model, low_zero=False, **split), **split)
    if "disk" in placed.values():
        raise InputError(f"arch {arch!r} does not fit the visible devices' memory (accelerate would offload to disk)")
    for name, param in model.named_parameters():
        owner = max((m for m in placed if m == "" or name == m or name.startswith(m + ".")), key=len)
        dev = placed[owner]
        value = (torch.ones(param.shape, dtype=dtype, device=dev) if param.dim() == 1  # norm weights
                 else torch.randn(param.shape, dtype=dtype, device=dev) * config.initializer_range)
        set_module_tensor_to_device(model, name, dev, value=value)
    return dispatch_model(model, device_map=placed).eval()


def need_cuda() -> torch.device:
    """The CUDA device the GPU benchmarks run on; InputError without one."""
    import torch

    if not torch.cuda.is_available():
        raise InputError("the benchmarks need a CUDA GPU; none is visible to torch")
    return torch.device("cuda")


def time_ms(fn) -> float:
    """Median of do_bench (CUDA events), with at least ~5 timed runs for slow functions."""
    import torch
    import triton.testing

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    return float(triton.testing.do_bench(fn, warmup=max(25, 2 * est), rep=max(100, 6 * est), return_mode="median"))


def env(device) -> dict:
    """Card, library versions and date of a run."""
    import torch
    import transformers
    import triton

    return {"card": torch.cuda.get_device_name(device), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def seq_label(seq: int) -> str:
    """4096 -> "4K"; a length that is not a multiple of 1024 as is."""
    return f"{seq // 1024}K" if seq % 1024 == 0 else str(seq)


def write(out_dir: Path, name: str, table: str, raw: dict) -> None:
    """``out_dir/name.md`` (the table) and ``out_dir/name.json`` (the raw numbers)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text(table + "\n")
    (out_dir / f"{name}.json").write_text(json.dumps(raw, indent=2) + "\n")
