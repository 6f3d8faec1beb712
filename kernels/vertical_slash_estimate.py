"""The vertical-slash estimate in Triton: column and band scores of the last queries, fused.

For every (batch, q head), with ``rows`` the last ``last_q`` positions and ``B = block_size``:

    probs[r, j] = softmax_j(scale * q[rows[r]] . k[j]) over the causal keys j <= rows[r]  (fp32)
    col[j]      = sum_r probs[r, j]                                  # vertical score of key j
    band[o]     = sum_r sum_{j: (rows[r] - j) // B == o} probs[r, j]  # slash score of band o

which is what :func:`trimix_probe.dynamic.vertical_slash_scores_ref` computes in torch through a
``[heads, last_q, seq]`` fp32 probability tensor (1 GB for 32 heads at 128K, read and written by
several passes). Here nothing of that size exists:

1. ``_row_stats_kernel``: split-K over key chunks, the running max and sum of ``exp2`` per row
   (no V, no output), one partial per chunk; the chunks merge in torch (``[bh, n_chunks, rows]``).
2. ``_scores_kernel``: one program per (head, key tile of ``B`` keys) recomputes the tile's scores,
   normalises them by the row's log-sum-exp and reduces them twice: over rows into the tile's
   column scores (each program owns its keys: no atomics), and into the few bands the tile meets.
   Tile ``t`` starts at key ``t * B``, so the band of (row r, key t*B + jj) is
   ``(rows[r] - jj) // B - t``: the tile writes its sums per ``c = (rows[r] - jj) // B``, which
   spans ``SPAN`` values for every tile alike, and torch adds them into ``band[c - t]``
   (shifted slices, deterministic: no float atomics, so a selection does not flip between runs).

Scores are ``tl.dot`` of the bf16/fp16 inputs with fp32 accumulation: the products are exact in
fp32, as in the reference's fp32 matmul (Qwen2.5's shallow layers have logits near 750, where a
bf16-rounded score would reorder the columns: ``tests/test_dynamic.py::test_estimate_scores_in_fp32``).
Softcap is applied to the scores; sinks are left out, as in the reference (one factor per row).

Verified against the torch reference under ``TRITON_INTERPRET=1`` at small shapes
(``tests/test_dynamic.py``: GQA 1/2/4/7, odd lengths, two row blocks, softcap, batch 2) and on one
H100 (2026-12-07: the gpu tests at 8191 and 40000 tokens; 1.38 ms at 128K for Llama-3.1-8B heads,
docs/performance.md). Not run: an H200, other GPUs, 32K/64K timings.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autotune import seq_bucket
from ._inputs import INTERPRET, check_block_size, check_qkv, on_device, padded_head_dim
from ._softmax import head_coords, load_q_tile, qk_scores, score_scales

ROWS = tl.constexpr(64)  # query rows a program holds (constexpr: a global the kernels read); [64, B] fp32 fits registers


@triton.jit
def _tile_scores(q, k_base, offs_n, pos, offs_d, stride_kn, qk_scale, cap, seq,
                 HEAD_DIM: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Scores (log2 units) of the q rows at ``pos`` against keys ``offs_n``, -inf off the causal set."""
    nmask = offs_n < seq
    k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None],
                mask=nmask[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)  # [BLOCK_D, N], K^T
    s = qk_scores(q, k, qk_scale, cap, HAS_SOFTCAP)
    keep = (offs_n[None, :] <= pos[:, None]) & nmask[None, :]
    return tl.where(keep, s, float("-inf"))


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 2), (4, 3), (8, 2), (4, 4))]


@triton.autotune(configs=_configs(), key=["seq_bucket", "HEAD_DIM", "GROUP", "BLOCK_N"])
@triton.jit(do_not_specialize=["seq", "seq_bucket", "q0", "n_rows", "chunk", "n_chunks"])
def _row_stats_kernel(Q, K, PartM, PartL, sm_scale, softcap, seq, seq_bucket, q0, n_rows, heads, chunk, n_chunks,
                      stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                      GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    # PartM, PartL: [batch * heads, n_chunks, n_rows] fp32, the max (log2 units) and the sum of exp2
    # of one chunk's scores per row; rows past n_rows are not stored
    bh = tl.program_id(0)
    c = tl.program_id(1)
    rows = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
    pos = q0 + rows  # rows past n_rows sit at pos >= seq: their q loads as zeros, nothing is stored
    b, h, kvh = head_coords(bh, heads, GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_q_tile(Q, b, h, pos, offs_d, stride_qb, stride_qh, stride_qm, seq, HEAD_DIM)
    qk_scale, cap = score_scales(sm_scale, softcap, HAS_SOFTCAP)
    k_base = K + b * stride_kb + kvh * stride_kh
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    lo = c * chunk
    hi = tl.minimum(lo + chunk, seq)
    for start_n in range(lo, hi, BLOCK_N):
        s = _tile_scores(q, k_base, start_n + tl.arange(0, BLOCK_N), pos, offs_d, stride_kn, qk_scale, cap, seq,
                         HEAD_DIM, HAS_SOFTCAP)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # no causal key yet: exp2(-inf) = 0, not NaN
        l_i = l_i * tl.math.exp2(m_i - m_sub) + tl.sum(tl.math.exp2(s - m_sub[:, None]), 1)
        m_i = m_new
    out = (bh.to(tl.int64) * n_chunks + c) * n_rows + rows
    tl.store(PartM + out, m_i, mask=rows < n_rows)
    tl.store(PartL + out, l_i, mask=rows < n_rows)


@triton.autotune(configs=_configs(), key=["seq_bucket", "HEAD_DIM", "GROUP", "BLOCK_N"])
@triton.jit(do_not_specialize=["seq", "seq_bucket", "q0", "n_rows", "n_tiles"])
def _scores_kernel(Q, K, Lse, ColPart, BandPart, sm_scale, softcap, seq, seq_bucket, q0, n_rows, heads, n_tiles,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, SPAN: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    # Lse [batch * heads, n_rows] (log2 units); ColPart [batch * heads, n_rb, seq];
    # BandPart [batch * heads, n_rb, n_tiles, SPAN]: entry i of tile t sums the probabilities whose
    # (pos - jj) // BLOCK_N is c_lo + i, c_lo = max(first row's pos - BLOCK_N + 1, 0) // BLOCK_N
    bh = tl.program_id(0)
    t = tl.program_id(1)
    rb = tl.program_id(2)
    n_rb = tl.num_programs(2)
    rows = rb * ROWS + tl.arange(0, ROWS)
    pos = q0 + rows
    rmask = rows < n_rows
    b, h, kvh = head_coords(bh, heads, GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_q_tile(Q, b, h, pos, offs_d, stride_qb, stride_qh, stride_qm, seq, HEAD_DIM)
    qk_scale, cap = score_scales(sm_scale, softcap, HAS_SOFTCAP)
    k_base = K + b * stride_kb + kvh * stride_kh
    bh64 = bh.to(tl.int64)
    lse = tl.load(Lse + bh64 * n_rows + rows, mask=rmask, other=0.0)
    jj = tl.arange(0, BLOCK_N)
    offs_n = t * BLOCK_N + jj
    s = _tile_scores(q, k_base, offs_n, pos, offs_d, stride_kn, qk_scale, cap, seq, HEAD_DIM, HAS_SOFTCAP)
    p = tl.math.exp2(s - lse[:, None])  # masked entries and padded rows: exp2(-inf) = 0
    p = tl.where(rmask[:, None], p, 0.0)
    part = bh64 * n_rb + rb
    tl.store(ColPart + part * seq + offs_n, tl.sum(p, 0), mask=offs_n < seq)
    # e = pos - jj < 0 only where j > pos (p = 0 there): clamped so the division stays a floor
    first = q0 + rb * ROWS
    c_lo = tl.maximum(first - BLOCK_N + 1, 0) // BLOCK_N
    c_rel = tl.maximum(pos[:, None] - jj[None, :], 0) // BLOCK_N - c_lo  # [ROWS, BLOCK_N] in [0, SPAN)
    band_ptr = BandPart + (part * n_tiles + t) * SPAN
    for i in tl.static_range(SPAN):
        tl.store(band_ptr + i, tl.sum(tl.sum(tl.where(c_rel == i, p, 0.0), 1), 0))


def span(block_size: int) -> int:
    """Distinct ``(pos - jj) // block_size`` over ``ROWS`` consecutive rows and ``block_size`` keys:
    at most ``(ROWS + block_size - 2) // block_size + 2``."""
    return (ROWS.value + block_size - 2) // block_size + 2


def _chunk(seq: int, block_n: int) -> int:
    """Keys per row-stats program: ~32 chunks a head, at least 4 tiles, a multiple of the tile."""
    want = max(triton.cdiv(seq_bucket(seq), 32), 4 * block_n)
    return triton.cdiv(want, block_n) * block_n


def vertical_slash_scores(q: torch.Tensor, k: torch.Tensor, *, last_q: int, block_size: int, scale: float,
                          softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and band scores of the last ``last_q`` queries (see the module docstring).

    q: [batch, heads, seq, head_dim]; k: [batch, kv_heads, seq, head_dim] (heads a multiple of
    kv_heads). Returns (col [batch, heads, seq], band [batch, heads, cdiv(seq, block_size)]), fp32.
    bf16/fp16, head_dim 64, 80, 96, 128, 256, block_size 16, 32, 64, 128; CUDA, or CPU under
    TRITON_INTERPRET=1. Inputs that require grad are read detached (the scores only rank keys).
    """
    q, k = q.detach(), k.detach()
    check_qkv("vertical_slash_scores", q, k, k)
    # shape constraints
    batch, heads, seq, head_dim = q.shape
    check_block_size("vertical_slash_scores", block_size)
    if not 1 <= last_q <= seq:
        raise ValueError(f"vertical_slash_scores: last_q {last_q}; accepted: 1 .. seq ({seq})")
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    group = heads // k.shape[1]
    block_d = padded_head_dim(head_dim)
    n_tiles = triton.cdiv(seq, block_size)
    n_rb = triton.cdiv(last_q, ROWS.value)
    q0 = seq - last_q
    bh = batch * heads
    chunk = _chunk(seq, block_size)
    n_chunks = triton.cdiv(seq, chunk)
    dev = q.device
    cap = 0.0 if softcap is None else float(softcap)
    flags = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_size, HAS_SOFTCAP=softcap is not None)
    part_m = torch.empty(bh, n_chunks, last_q, device=dev, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    col_part = torch.empty(bh, n_rb, seq, device=dev, dtype=torch.float32)
    band_part = torch.empty(bh, n_rb, n_tiles, span(block_size), device=dev, dtype=torch.float32)
    strides = (*q.stride()[:3], *k.stride()[:3])
    with on_device(q):
        _row_stats_kernel[(bh, n_chunks, n_rb)](q, k, part_m, part_l, scale, cap, seq, seq_bucket(seq), q0, last_q,
                                                heads, chunk, n_chunks, *strides, **flags)
        m = part_m.amax(1, keepdim=True)  # every row has a causal key (key 0): finite
        lse = (m + torch.log2((part_l * torch.exp2(part_m - m)).sum(1, keepdim=True))).squeeze(1).contiguous()
        _scores_kernel[(bh, n_tiles, n_rb)](q, k, lse, col_part, band_part, scale, cap, seq, seq_bucket(seq), q0,
                                            last_q, heads, n_tiles, *strides, SPAN=span(block_size), **flags)
    col = col_part.sum(1) if n_rb > 1 else col_part[:, 0]
    band = torch.zeros(bh, n_tiles, device=dev, dtype=torch.float32)
    for rb in range(n_rb):  # band[c - t] += band_part[rb, t, c - c_lo]: a reversed slice per i
        c_lo = max(q0 + rb * ROWS.value - block_size + 1, 0) // block_size
        for i in range(span(block_size)):
            top = c_lo + i  # band o = top - t
            t_lo, t_hi = max(0, top - (n_tiles - 1)), min(n_tiles - 1, top)
            if t_lo <= t_hi:
                band[:, top - t_hi:top - t_lo + 1] += band_part[:, rb, t_lo:t_hi + 1, i].flip(-1)
    return col.view(batch, heads, seq), band.view(batch, heads, n_tiles)
