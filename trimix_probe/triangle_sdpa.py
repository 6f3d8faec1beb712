"""Exact triangle attention from fused SDPA calls, on any device and dtype (the path off Triton).

Same pattern as :func:`trimix_probe.reference.triangle_attention_ref` (row ``i`` sees ``j <= i``
with ``j < n_init`` or ``i - j < n_local``; the last ``last_n`` rows see every ``j <= i``), in two
SDPA calls instead of masked matmuls:

    band rows (i < seq - last_n), in query blocks of BLOCK rows starting at s:
        keys  = [sinks k[:n_init]] + [window k[s - n_local + 1 : s + BLOCK]]     # n_init + n_local + BLOCK - 1
        out   = SDPA(q_block, keys, mask = band_mask)                               # all blocks in one call
    last rows: dense_last_rows (one SDPA call, bottom-right causal mask; the dynamic layers use it too)

The blocks' keys are gathered once per layer (``seq / BLOCK`` copies of ``n_init + n_local + BLOCK``
keys: a few times K, not ``seq x seq``). GQA: the query heads of a kv head are folded into its rows,
so K/V are never repeated. Cost: ``seq * (n_init + n_local + BLOCK) + last_n * seq`` key-query pairs
instead of ``seq^2 / 2``. Not differentiable-checked; no LSE output (SDPA returns none).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from .config import TRIANGLE
from .kernels._inputs import check_window
from .reference import masked_attention

BLOCK = 128  # query rows per band block; each block reads BLOCK - 1 keys it masks out, per row


def check_triangle_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_init, n_local, last_n) -> None:
    """One ValueError naming the bad argument (shapes as in :func:`triangle_attention_sdpa`)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d torch.Tensor [batch, heads, seq, head_dim], got "
                             f"{type(t).__name__}{'' if not isinstance(t, torch.Tensor) else f' of shape {tuple(t.shape)}'}")
    b, h, seq, d = q.shape
    if k.shape != v.shape[:3] + (k.shape[3],) or k.shape[0] != b or k.shape[2] != seq or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [batch, kv_heads, seq, head_dim] "
                         f"matching q {tuple(q.shape)} (triangle attention is a prefill pattern)")
    if h % k.shape[1]:
        raise ValueError(f"q heads ({h}) must be a multiple of kv heads ({k.shape[1]})")
    check_window("triangle_attention_sdpa", n_init, n_local, last_n)


@lru_cache(maxsize=4)
def band_bias(n_blocks: int, block: int, n_init: int, n_local: int, group: int, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """:func:`band_mask` as SDPA's additive mask, [1, n_blocks, group * block, keys] (0 or -inf), built
    once for every triangle layer of a prefill (cached: the mask and SDPA's bool-to-float conversion
    cost as much as the attention at 4K). 4-d: the fused CPU kernel takes a mask only as
    [batch or 1, heads or 1, rows, keys]; a 3-d one sends SDPA to its math path."""
    keep = band_mask(n_blocks, block, n_init, n_local, device).repeat(1, group, 1)[None]
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf"))


def band_mask(n_blocks: int, block: int, n_init: int, n_local: int, device) -> torch.Tensor:
    """[n_blocks, block, n_init + n_local + block - 1] bool: which gathered key each band row keeps.
    Block ``b`` holds rows ``i = b * block + r``; its keys are the sinks ``j = c`` (``c < n_init``)
    then the window ``j = b * block - n_local + 1 + w``."""
    rows = (torch.arange(n_blocks, device=device) * block)[:, None, None] + torch.arange(block, device=device)[:, None]
    sink_j = torch.arange(n_init, device=device)[None, None, :]
    win_j = ((torch.arange(n_blocks, device=device) * block - n_local + 1)[:, None, None]
             + torch.arange(n_local + block - 1, device=device)[None, None, :])
    sinks = sink_j <= rows  # [n_blocks, block, n_init]
    # a window key below n_init is a sink, already kept in the sink columns (and j < 0 is padding)
    window = (win_j >= n_init) & (win_j <= rows) & (rows - win_j < n_local)  # [n_blocks, block, window]
    return torch.cat([sinks, window], dim=-1)


def triangle_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    n_init: int = TRIANGLE.n_init,
    n_local: int = TRIANGLE.n_local,
    last_n: int = TRIANGLE.last_n,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    block: int = BLOCK,
) -> torch.Tensor:
    """Triangle attention, exact, from fused SDPA calls (any device, any dtype SDPA takes).

    q: [batch, heads, seq, head_dim]; k, v: [batch, kv_heads, seq, head_dim]. Returns
    [batch, heads, seq, head_dim] in q's dtype. ``block``: query rows per band block. ``softcap``
    and ``sinks`` (learned sink logits) are not supported here: a ValueError says so.
    """
    if softcap is not None or sinks is not None:
        raise ValueError("triangle_attention_sdpa: softcap and learned sinks are not supported on the SDPA "
                         "path; use the torch reference (trimix_probe.reference.triangle_attention_ref)")
    check_triangle_args(q, k, v, n_init, n_local, last_n)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an int >= 1, got {block!r}")
    batch, heads, seq, d = q.shape
    kv_heads, dv = k.shape[1], v.shape[-1]
    group = heads // kv_heads
    # the same mask: i - j < seq always holds, and j < seq is the whole prompt
    n_init, n_local = min(n_init, seq), min(n_local, seq)
    band = seq - min(last_n, seq)  # rows that see sinks + window only
    out = torch.empty(batch, heads, seq, dv, dtype=q.dtype, device=q.device)
    if band > 0:
        n_blocks = -(-band // block)
        width = n_local + block - 1
        # keys padded so block b's window is kp[b * block : b * block + width] (front: n_local - 1 rows
        # before key 0; back: up to the last block's end); padded keys are masked out
        back = max(0, n_blocks * block - seq)

        def blocks(x: torch.Tensor) -> torch.Tensor:  # [batch, kv_heads, seq, dx] -> [b * kv, n_blocks, keys, dx]
            xp = F.pad(x, (0, 0, n_local - 1, back))
            win = xp.unfold(2, width, block)[:, :, :n_blocks].transpose(-1, -2)  # [b, kv, n_blocks, width, dx]
            if n_init:
                sink = x[:, :, None, :n_init].expand(-1, -1, n_blocks, -1, -1)
                win = torch.cat([sink, win], dim=3)
            return win.reshape(batch * kv_heads, n_blocks, n_init + width, x.shape[-1])

        # queries: [b, kv, group, rows, d] -> [b * kv, n_blocks, group * block, d] (the group in the rows)
        qb = F.pad(q[:, :, :band], (0, 0, 0, n_blocks * block - band))
        qb = qb.reshape(batch, kv_heads, group, n_blocks, block, d).transpose(2, 3)
        qb = qb.reshape(batch * kv_heads, n_blocks, group * block, d)
        mask = band_bias(n_blocks, block, n_init, n_local, group, q.dtype, q.device)
        o = F.scaled_dot_product_attention(qb, blocks(k), blocks(v), attn_mask=mask, scale=scale)
        o = o.reshape(batch, kv_heads, n_blocks, group, block, dv).transpose(2, 3)
        out[:, :, :band] = o.reshape(batch, heads, n_blocks * block, dv)[:, :, :band]
    return dense_last_rows(out, q, k, v, seq - band, scale=scale)


def dense_last_rows(out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, n: int, *,
                    scale: float | None = None, softcap: float | None = None,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Overwrite the last ``n`` query rows of ``out`` with exact causal attention over all their keys,
    in place. One SDPA call, with the query heads of each kv head folded into its rows
    ([batch, kv_heads, group * n, d] against the kv head's keys), so K/V are neither copied nor
    repeated (``enable_gqa`` with a mask may take SDPA's math path, which repeats them); the mask is
    the bottom-right causal one, [group * n, seq] booleans, no seq x seq tensor. With ``softcap`` or
    ``sinks`` (which SDPA does not take): :func:`~trimix_probe.reference.masked_attention` over the last
    rows, in fp32 query chunks."""
    batch, heads, seq, d = query.shape
    n = min(n, seq)
    if n <= 0:
        return out
    if softcap is not None or sinks is not None:
        out[:, :, seq - n:] = masked_attention(query[:, :, seq - n:], key, value, lambda q_idx, kv_idx: kv_idx <= q_idx,
                                               scale=scale, softcap=softcap, sinks=sinks)[0]
        return out
    kv_heads = key.shape[1]
    group = heads // kv_heads
    rows = torch.arange(seq - n, seq, device=query.device).repeat(group)[:, None]  # [group * n, 1]
    mask = torch.arange(seq, device=query.device)[None, :] <= rows  # [group * n, seq]
    q_last = query[:, :, seq - n:].reshape(batch, kv_heads, group * n, d)
    last = F.scaled_dot_product_attention(q_last, key, value, attn_mask=mask, scale=scale)
    out[:, :, seq - n:] = last.view(batch, heads, n, value.shape[-1])
    return out
