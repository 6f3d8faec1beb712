"""What every attention kernel launcher accepts, checked in one place, and the launcher prologue
they share (checks, layout, defaults, output buffer)."""

from __future__ import annotations

import contextlib
import math
import os
from typing import NamedTuple

import torch

HEAD_DIMS = (64, 80, 96, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)
BLOCK_SIZES = (16, 32, 64, 128)  # selection block sizes of the block-sparse kernels
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def check_qkv(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """One clear ValueError per bad input (TypeError for a non-tensor), naming it and what is accepted.
    q: [batch, heads, seq, head_dim]; k, v: [batch, kv_heads, seq, head_dim] (prefill)."""
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            kind = type(t)
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {kind.__module__}.{kind.__qualname__} "
                            "(convert with torch.as_tensor(...).to(device, dtype))")
        if t.dim() != 4:
            raise ValueError(f"{name}: {arg} must be a 4-d tensor [batch, heads, seq, head_dim], "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name}: {arg} has dtype {t.dtype}; accepted: torch.float16, torch.bfloat16")
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: {arg} has dtype {t.dtype} but q has {q.dtype}; use one dtype")
        if t.device != q.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but q is on {q.device}; use one device")
    b, h, s, d = q.shape
    if d not in HEAD_DIMS:
        raise ValueError(f"{name}: q has head_dim {d}; accepted: {', '.join(map(str, HEAD_DIMS))}")
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(f"{name}: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit q {tuple(q.shape)}: expected "
                         f"[{b}, kv_heads, {s}, {d}] for both (prefill: same batch, seq and head_dim)")
    if k.shape[1] == 0 or h % k.shape[1] != 0:
        raise ValueError(f"{name}: q has {h} heads, k/v have {k.shape[1]} kv heads; heads must be a multiple "
                         "of kv_heads (GQA)")
    if not (q.is_cuda or INTERPRET):
        raise ValueError(f"{name}: q is on {q.device}; accepted: a CUDA device (or any device under "
                         "TRITON_INTERPRET=1)")


class Launch(NamedTuple):
    """What a launcher passes on after :func:`prepare`."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor  # [batch, heads, seq, head_dim], q's dtype, contiguous
    scale: float
    softcap: float  # 0.0 when off (the kernels read it only under HAS_SOFTCAP)
    sinks: torch.Tensor | None  # [heads] fp32, contiguous, on q's device
    block_d: int  # head_dim padded to a power of two (tl.arange needs one), at least 16 (tl.dot)


def prepare(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
            softcap: float | None = None, sinks: torch.Tensor | None = None, block_size: int | None = None) -> Launch:
    """The launcher prologue: :func:`check_qkv`, the softcap and sinks checks (one ValueError each),
    the block size of a block-sparse kernel when given, the default scale ``1/sqrt(head_dim)`` and
    the output buffer. q, k, v come back with a unit
    head_dim stride (copied only if they lack one): the kernels index head_dim with unit stride
    (128-bit vector loads)."""
    check_qkv(name, q, k, v)
    heads, head_dim = q.shape[1], q.shape[3]
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"{name}: softcap {softcap!r}; accepted: None or a positive finite number")
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or tuple(sinks.shape) != (heads,):
            raise ValueError(f"{name}: sinks {tuple(getattr(sinks, 'shape', ()))}; accepted: None or one logit "
                             f"per q head, a tensor [{heads}]")
        sinks = sinks.detach().to(device=q.device, dtype=torch.float32).contiguous()
    if block_size is not None:
        check_block_size(name, block_size)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return Launch(q, k, v, out, scale, 0.0 if softcap is None else float(softcap), sinks, padded_head_dim(head_dim))


def padded_head_dim(head_dim: int) -> int:
    """head_dim padded to a power of two (tl.arange needs one), at least 16 (tl.dot)."""
    return max(1 << (head_dim - 1).bit_length(), 16)


def check_block_size(name: str, block_size: int) -> None:
    """A block-sparse selection's block size: one of :data:`BLOCK_SIZES` (a ValueError naming it)."""
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"{name}: block_size {block_size}; accepted: {', '.join(map(str, BLOCK_SIZES))}")


def on_device(t: torch.Tensor):
    """Launch context: the tensor's CUDA device (Triton launches on the current one), else nothing."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_window(name: str, n_init, n_local, last_n) -> None:
    """The triangle's shape: integers with n_init >= 0, n_local >= 1, last_n >= 0 (a ValueError
    naming the bad value; an if, not an assert, so it holds under ``python -O``)."""
    for arg, value, low in (("n_init", n_init, 0), ("n_local", n_local, 1), ("last_n", last_n, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: {arg} must be an integer >= {low}, got {value!r}")


def check_no_grad(name: str, *tensors: torch.Tensor) -> None:
    """The kernels have no backward: refuse inputs that would record a graph, instead of returning
    an output gradients silently stop at."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(f"{name}: the Triton kernel has no backward, and an input requires grad; call it "
                           "under torch.no_grad() or torch.inference_mode(), or use the torch reference "
                           "(trimix_probe.triangle_attention_ref) to differentiate")
