"""Triangle attention in Triton: sink + local band for every row, dense causal for the last rows.

Row ``i`` attends to keys ``j <= i`` with ``j < n_init`` or ``i - j < n_local``; the last ``last_n``
rows attend to every ``j <= i``. Three launches:

1. ``_band_kernel``: one program per (query block, batch * head). It visits the sink keys and the
   local window only, with element masks on the boundary blocks and none on the interior ones.
   It writes every row (the last rows too; step 3 overwrites them).
2. ``_last_kernel``: the last rows over all their keys, split into ``chunk``-key pieces across
   programs (split-K), each writing a partial output and log-sum-exp in fp32.
3. ``_merge_kernel``: merges the partials by log-sum-exp into ``out`` and ``lse``.

GQA reads K/V of kv head ``h // group`` through strides (no copy); the grid runs the q heads of one
kv head next to each other so their K/V tiles are shared through L2.

Verified against the torch reference (``trimix_probe.reference``) under ``TRITON_INTERPRET=1`` at
small shapes and on an H100 and an H200 (see docs/performance.md); other GPUs (Ampere, consumer cards)
not run.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from ._inputs import DTYPES, HEAD_DIMS, check_qkv, seq_bucket  # noqa: F401 (DTYPES, HEAD_DIMS: public)
from ._inputs import INTERPRET as _INTERPRET
from ._softmax import UPCAST_DOT as _UPCAST_DOT
from ._softmax import online_softmax

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def _attn_step(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_d, stride_kn, stride_vn, qk_scale, seq,
               n_init, n_local,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK: tl.constexpr, BAND: tl.constexpr, SINK: tl.constexpr):
    """One key block of online softmax. Scores are in log2 units (qk_scale = scale * log2(e), applied
    to the fp32 scores rather than to q, which would add a rounding of q in bf16).

    MASK=False is the interior path: every (row, key) of the tile is kept, so no compare, no
    select and no load mask (except on head_dim when it is padded to a power of two)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None]  # [BLOCK_D, BLOCK_N], K^T
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    if MASK:
        kmask = (offs_n[None, :] < seq) & (offs_d[:, None] < HEAD_DIM)
        vmask = (offs_n[:, None] < seq) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_ptrs, mask=kmask, other=0.0)
        v = tl.load(v_ptrs, mask=vmask, other=0.0)
    elif HEAD_DIM != BLOCK_D:
        k = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if _UPCAST_DOT:
        s = tl.dot(q.to(tl.float32), k.to(tl.float32)) * qk_scale
    else:
        s = tl.dot(q, k) * qk_scale  # [BLOCK_M, BLOCK_N]
    if MASK:
        keep = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < seq)
        if SINK:
            keep = keep & (offs_n[None, :] < n_init)
        elif BAND:
            keep = keep & ((offs_n[None, :] < n_init) | (offs_m[:, None] - offs_n[None, :] < n_local))
    else:
        keep = None  # not read: MASK=False folds the whole tile
    return online_softmax(acc, l_i, m_i, s, keep, v, MASK, _UPCAST_DOT)


def _configs(band: bool) -> list[triton.Config]:
    if _INTERPRET:  # the interpreter would run every config: give it one small one
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    if band:  # short loops (~10 key blocks a program): shallow pipelines
        shapes = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3)]
    else:  # long unmasked loops over a chunk: deeper pipelines pay off
        shapes = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 4), (64, 64, 4, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def keep(conf: triton.Config) -> bool:
    """Drop 8-warp configs on tiles smaller than 64 x 64: two warpgroups then split an MMA too small
    to feed them (the fused-attention tutorial drops the same on Hopper)."""
    return not (conf.num_warps == 8 and conf.kwargs["BLOCK_M"] * conf.kwargs["BLOCK_N"] < 64 * 64)


def _prune(configs, named_args, **kwargs):
    """head_dim 256: a 128-row fp32 accumulator spills, and 3+ stages of 256-wide K/V tiles
    exceed the 228 KB of shared memory of an H100. Padded head_dims (80, 96): two configs, to keep
    the first-call compile short for shapes that are rarely timed."""
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 0))
    if _INTERPRET:
        return configs
    if head_dim > 128:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
                triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)]
    if head_dim not in (64, 128):
        return configs[:2]
    return configs


_NO_SPEC = ["seq", "seq_bucket", "n_init", "n_local", "row0", "n_last"]  # lengths vary per prompt: no recompiles


@triton.autotune(configs=list(filter(keep, _configs(band=True))), key=["seq_bucket", "HEAD_DIM", "GROUP"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=_NO_SPEC[:4])
def _band_kernel(Q, K, V, Out, Lse, sm_scale, seq, seq_bucket, n_init, n_local, heads,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SINK_N: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # axis 0 is batch * head, fastest in launch order: the q heads of one kv head run together
    bh = tl.program_id(0)
    m_start = tl.program_id(1) * BLOCK_M
    b = bh // heads
    h = bh % heads
    kvh = h // GROUP
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # 64-bit bases: batch * heads * seq * head_dim passes 2**31 at batch 4, seq 128K
    b = b.to(tl.int64)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < seq) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    m_end = tl.minimum(m_start + BLOCK_M, seq)  # keys j < m_end can be causal for this block
    lo = tl.maximum(m_start - n_local + 1, 0)  # first key in the window of the first row
    lo_blk = (lo // BLOCK_N) * BLOCK_N
    # sink keys before the window, in small blocks (n_init is usually a handful of keys)
    sink_hi = tl.minimum(n_init, lo_blk)
    for start_n in range(0, sink_hi, SINK_N):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_d, stride_kn,
                                   stride_vn, qk_scale, seq, n_init, n_local, SINK_N, HEAD_DIM, BLOCK_D,
                                   True, True, True)
    # window [lo_blk, m_end): masked head blocks (window start cuts the tile), unmasked interior,
    # masked tail blocks (the causal diagonal)
    full_lo = tl.maximum(((m_start + BLOCK_M - n_local + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, lo_blk)
    full_lo = tl.minimum(full_lo, m_end)
    full_hi = tl.maximum(((m_start + 1) // BLOCK_N) * BLOCK_N, full_lo)
    for start_n in range(lo_blk, full_lo, BLOCK_N):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_d, stride_kn,
                                   stride_vn, qk_scale, seq, n_init, n_local, BLOCK_N, HEAD_DIM, BLOCK_D,
                                   True, True, False)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_d, stride_kn,
                                   stride_vn, qk_scale, seq, n_init, n_local, BLOCK_N, HEAD_DIM, BLOCK_D,
                                   False, True, False)
    for start_n in range(full_hi, m_end, BLOCK_N):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_d, stride_kn,
                                   stride_vn, qk_scale, seq, n_init, n_local, BLOCK_N, HEAD_DIM, BLOCK_D,
                                   True, True, False)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < seq) & (offs_d[None, :] < HEAD_DIM))
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
    tl.store(Lse + bh * seq + offs_m, lse, mask=offs_m < seq)


@triton.autotune(configs=list(filter(keep, _configs(band=False))), key=["seq_bucket", "HEAD_DIM", "GROUP"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["seq", "seq_bucket", "row0", "n_last"])
def _last_kernel(Q, K, V, PartO, PartLse, sm_scale, seq, seq_bucket, row0, n_last, heads, chunk, n_chunks,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # partials: PartO [batch * heads, n_chunks, n_last, BLOCK_D] fp32, PartLse [batch * heads, n_chunks, n_last]
    bh = tl.program_id(0)
    c = tl.program_id(1)
    r_start = row0 + tl.program_id(2) * BLOCK_M
    b = bh // heads
    h = bh % heads
    kvh = h // GROUP
    offs_m = r_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # 64-bit bases: batch * heads * seq * head_dim passes 2**31 at batch 4, seq 128K
    b = b.to(tl.int64)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < seq) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    c_lo = c * chunk
    c_hi = tl.minimum(c_lo + chunk, tl.minimum(r_start + BLOCK_M, seq))
    # keys below the first row's position (and inside seq) are kept by every row: no mask
    full_hi = tl.maximum(tl.minimum(((r_start + 1) // BLOCK_N) * BLOCK_N, c_hi), c_lo)
    for start_n in range(c_lo, full_hi, BLOCK_N):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_d, stride_kn,
                                   stride_vn, qk_scale, seq, 0, 0, BLOCK_N, HEAD_DIM, BLOCK_D, False, False, False)
    for start_n in range(full_hi, c_hi, BLOCK_N):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_d, stride_kn,
                                   stride_vn, qk_scale, seq, 0, 0, BLOCK_N, HEAD_DIM, BLOCK_D, True, False, False)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    # a chunk wholly above the diagonal leaves l = 0: its lse is -inf and the merge skips it
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    rows = offs_m - row0
    part = bh * n_chunks + c
    o_ptrs = PartO + (part * n_last + rows[:, None]) * BLOCK_D + offs_d[None, :]
    tl.store(o_ptrs, out, mask=rows[:, None] < n_last)
    tl.store(PartLse + part * n_last + rows, lse, mask=rows < n_last)


@triton.jit
def _merge_kernel(PartO, PartLse, Out, Lse, seq, row0, n_last, heads, n_chunks, stride_ob, stride_oh, stride_om,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < n_last
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for c in range(0, n_chunks):
        part = bh * n_chunks + c
        lse_c = tl.load(PartLse + part * n_last + rows, mask=rmask, other=float("-inf"))
        o_c = tl.load(PartO + (part * n_last + rows[:, None]) * BLOCK_D + offs_d[None, :], mask=rmask[:, None],
                      other=0.0)
        m_new = tl.maximum(m_i, lse_c)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_sub)
        w = tl.exp(lse_c - m_sub)
        acc = acc * alpha[:, None] + w[:, None] * o_c
        s_i = s_i * alpha + w
        m_i = m_new
    s_safe = tl.where(s_i == 0.0, 1.0, s_i)
    out = acc / s_safe[:, None]
    pos = row0 + rows
    o_ptrs = Out + b * stride_ob + h * stride_oh + pos[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=rmask[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(Lse + bh * seq + pos, m_i + tl.log(s_safe), mask=rmask)


def _chunk(seq: int) -> int:
    """Keys per split-K program for the last rows: ~32 chunks a head, each at least 512 keys
    (a multiple of every BLOCK_N)."""
    if _INTERPRET:
        return 32
    return min(max(seq_bucket(seq) // 32, 512), 4096)


def triangle_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, n_init: int = 8, n_local: int = 512,
                       last_n: int = 128, scale: float | None = None, return_lse: bool = False):
    """Triangle attention. q: [batch, heads, seq, head_dim]; k, v: [batch, kv_heads, seq, head_dim]
    (heads a multiple of kv_heads; any strides with a unit head_dim stride, else copied).

    Row i attends to keys j <= i with j < n_init or i - j < n_local; rows i >= seq - last_n attend
    to every j <= i. Returns out [batch, heads, seq, head_dim] in q's dtype, and with
    ``return_lse`` also lse [batch, heads, seq] fp32 (natural log of the sum of exp of the scaled
    scores). bf16/fp16, head_dim 64, 80, 96, 128, 256; CUDA, or CPU under TRITON_INTERPRET=1.
    """
    check_qkv("triangle_attention", q, k, v)
    # shape constraints
    batch, heads, seq, head_dim = q.shape
    kv_heads = k.shape[1]
    assert heads % kv_heads == 0 and k.shape == v.shape == (batch, kv_heads, seq, head_dim)
    assert n_init >= 0 and n_local >= 1 and last_n >= 0, "n_init >= 0, n_local >= 1, last_n >= 0"
    # the kernels index head_dim with unit stride (128-bit vector loads)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((batch, heads, seq), device=q.device, dtype=torch.float32)
    if seq == 0 or batch == 0:
        return (out, lse) if return_lse else out
    group = heads // kv_heads
    block_d = max(triton.next_power_of_2(head_dim), 16)
    bucket = seq_bucket(seq)
    n_last = min(last_n, seq)
    row0 = seq - n_last
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if row0 > 0:  # rows before the last ones; when every row is a last row the band is skipped
            grid = lambda meta: (batch * heads, triton.cdiv(row0, meta["BLOCK_M"]))  # noqa: E731
            _band_kernel[grid](q, k, v, out, lse, scale, seq, bucket, n_init, n_local, heads,
                               *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                               GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, SINK_N=16)
        if n_last > 0:
            chunk = _chunk(seq)
            n_chunks = triton.cdiv(seq, chunk)
            part_o = torch.empty((batch * heads, n_chunks, n_last, block_d), device=q.device, dtype=torch.float32)
            part_lse = torch.empty((batch * heads, n_chunks, n_last), device=q.device, dtype=torch.float32)
            grid = lambda meta: (batch * heads, n_chunks, triton.cdiv(n_last, meta["BLOCK_M"]))  # noqa: E731
            _last_kernel[grid](q, k, v, part_o, part_lse, scale, seq, bucket, row0, n_last, heads, chunk, n_chunks,
                               *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                               GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d)
            merge_m = 16 if _INTERPRET else 32
            _merge_kernel[(batch * heads, triton.cdiv(n_last, merge_m))](
                part_o, part_lse, out, lse, seq, row0, n_last, heads, n_chunks, *out.stride()[:3],
                HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=merge_m)
    return (out, lse) if return_lse else out
