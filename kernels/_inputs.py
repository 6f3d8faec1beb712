"""What every attention kernel launcher accepts, checked in one place, and the autotune bucket."""

from __future__ import annotations

import os

import torch

HEAD_DIMS = (64, 80, 96, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def check_qkv(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """One clear ValueError per bad input, naming it and what is accepted.
    q: [batch, heads, seq, head_dim]; k, v: [batch, kv_heads, seq, head_dim] (prefill)."""
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
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


def seq_bucket(seq: int) -> int:
    """Autotune key: next power of two, so a new prompt length reuses the tuned config."""
    return 1 << max(seq - 1, 0).bit_length()
