"""Pure-torch reference of the attention patterns: masks, sections and masked attention.

Tests, the CPU fallback of the runtime and the probe share these. They work on any device and
dtype; memory is bounded by processing queries in chunks (``block_q`` rows at a time), so no
``seq x seq`` tensor is built at long ``seq``.

Vocabulary (for a prompt of ``seq`` tokens, query row ``q_idx``, key ``kv_idx``, causal ``kv_idx <= q_idx``):

- *init*   : ``kv_idx < n_init`` (attention sinks);
- *local*  : ``q_idx - kv_idx < n_local``, not init;
- *last*   : ``q_idx >= seq - last_n``, neither init nor local;
- *middle* : the rest of the causal mask.

init + local + last is the *triangle*; middle is what TriangleMix drops.
"""

from __future__ import annotations

import math
from enum import IntEnum
from typing import Callable

import torch

MaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (q_idx [M, 1], kv_idx [1, N]) -> bool [M, N]


class Section(IntEnum):
    """The four sections that partition the causal mask."""

    init = 0
    local = 1
    last = 2
    middle = 3


def section_ids(q_idx: torch.Tensor, kv_idx: torch.Tensor, seq: int, n_init: int, n_local: int,
                last_n: int) -> torch.Tensor:
    """Section of every (q_idx, kv_idx) pair (broadcast), or -1 where the pair is not causal."""
    causal = kv_idx <= q_idx
    init = kv_idx < n_init
    local = ~init & (q_idx - kv_idx < n_local)
    last = ~init & ~local & (q_idx >= seq - last_n)
    sec = torch.full(torch.broadcast_shapes(q_idx.shape, kv_idx.shape), int(Section.middle),
                     dtype=torch.int8, device=q_idx.device)
    sec = torch.where(last, int(Section.last), sec)
    sec = torch.where(local, int(Section.local), sec)
    sec = torch.where(init, int(Section.init), sec)
    return torch.where(causal, sec, -1)


def triangle_mask_fn(seq: int, n_init: int, n_local: int, last_n: int) -> MaskFn:
    """Mask function of triangle attention: row i sees j <= i with j < n_init or i - j < n_local,
    and the last ``last_n`` rows see every j <= i."""

    def fn(q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        keep = (kv_idx < n_init) | (q_idx - kv_idx < n_local) | (q_idx >= seq - last_n)
        return keep & (kv_idx <= q_idx)

    return fn


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_fn: MaskFn,
    *,
    scale: float | None = None,
    block_q: int = 1024,
    compute_dtype: torch.dtype | None = torch.float32,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention restricted to ``mask_fn``, exact, in query chunks.

    q: [batch, heads, seq_q, head_dim]; k, v: [batch, kv_heads, seq_k, head_dim] (GQA by
    broadcasting a view, no copy of K/V); query row r has absolute position ``seq_k - seq_q + r``.
    Returns ``out`` [batch, heads, seq_q, v's head_dim] in q's dtype and ``lse`` [batch, heads, seq_q]
    (fp32, natural log of the sum of exp(scaled scores) over kept keys; -inf and out = 0 for a row
    that keeps no key). ``compute_dtype=None`` computes in the input dtype (plain torch at that
    precision, the yardstick for kernel error bounds). Differentiable.

    ``softcap`` (Gemma-2's ``attn_logit_softcapping``): the scaled scores become
    ``softcap * tanh(scores / softcap)`` before the mask. ``sinks`` [heads] (gpt-oss's learned sink
    logits, one per q head): each row's softmax denominator gains ``exp(sinks[h])``, a key without a
    value; ``lse`` then includes it (a row that keeps no key gets lse = sinks[h], out = 0).
    """
    b, h, sq, d = q.shape
    bk, hk, sk, dk = k.shape
    assert (b, d) == (bk, dk) and v.shape[:3] == k.shape[:3], "q, k, v shapes disagree"
    assert h % hk == 0, f"heads ({h}) must be a multiple of kv_heads ({hk})"
    group = h // hk
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dt = compute_dtype or q.dtype
    # [batch, kv_heads, group, q_pos, head_dim]: GQA as a broadcast, K/V stay [batch, kv_heads, 1, k_pos, d]
    qg = q.reshape(b, hk, group, sq, d).to(dt)
    kg, vg = k.unsqueeze(2).to(dt), v.unsqueeze(2).to(dt)
    kv_idx = torch.arange(sk, device=q.device)[None, :]
    assert sinks is None or tuple(sinks.shape) == (h,), f"sinks: one logit per q head, [{h}]"
    # [1, kv_heads, group, 1] fp32, the layout of lse
    sink = None if sinks is None else sinks.float().reshape(1, hk, group, 1)
    outs, lses = [], []
    for start in range(0, sq, block_q):
        stop = min(sq, start + block_q)
        q_idx = torch.arange(start, stop, device=q.device)[:, None] + (sk - sq)
        keep = mask_fn(q_idx, kv_idx)  # [q_pos, k_pos]
        scores = torch.matmul(qg[:, :, :, start:stop], kg.transpose(-1, -2)) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~keep, float("-inf"))  # [batch, kv_head, group, q_pos, k_pos]
        lse = torch.logsumexp(scores.float(), dim=-1)
        if sink is not None:
            lse = torch.logaddexp(lse, sink)
        p = torch.exp(scores - lse.to(dt)[..., None]).nan_to_num(0.0)
        outs.append(torch.matmul(p, vg))
        lses.append(lse)
    out = torch.cat(outs, dim=3).reshape(b, h, sq, v.shape[-1]).to(q.dtype)  # v's head_dim (MLA: not q's)
    return out, torch.cat(lses, dim=3).reshape(b, h, sq)


def triangle_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    n_init: int = 8,
    n_local: int = 512,
    last_n: int = 128,
    scale: float | None = None,
    return_lse: bool = False,
    compute_dtype: torch.dtype | None = torch.float32,
    block_q: int = 1024,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
):
    """Reference of :func:`trimix_probe.triangle_attention` (same signature and semantics;
    ``softcap`` and ``sinks`` as in :func:`masked_attention`)."""
    seq = q.shape[2]
    assert k.shape[2] == seq, "triangle attention is a prefill pattern: q and k must have the same length"
    out, lse = masked_attention(q, k, v, triangle_mask_fn(seq, n_init, n_local, last_n), scale=scale,
                                block_q=block_q, compute_dtype=compute_dtype, softcap=softcap, sinks=sinks)
    return (out, lse) if return_lse else out
