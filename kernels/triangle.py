"""Triangle attention in Triton: sink + local band for every row, dense causal for the last rows.

Row ``i`` attends to keys ``j <= i`` with ``j < n_init`` or ``i - j < n_local``; the last ``last_n``
rows attend to every ``j <= i``. Three launches:

1. ``_band_kernel``: one program per (query block, batch * head). It visits the sink keys and the
   local window only, with element masks on the boundary blocks and none on the interior ones.
   It writes every row (the last rows too; step 3 overwrites them).
2. ``_last_kernel``: the last rows over all their keys, split into ``chunk``-key pieces across
   programs (split-K), each writing a partial output and log-sum-exp in fp32.
3. ``_merge_kernel``: merges the partials by log-sum-exp into ``out`` and ``lse``.

GQA reads K/V of kv head ``h // group`` through strides (no copy). The band kernel packs the q
heads of one kv head into the rows of one program (``pack_heads``: 4 heads x 32 positions in a
128-row tile for Llama's GQA 4), so each K/V tile loaded into shared memory serves all of them; the
last-rows kernel runs the q heads of one kv head next to each other, sharing K/V tiles through L2.

Softcap (a tanh cap on the scores, in every step) and sinks (one logit per q head in the softmax
denominator: folded in after the band's loops, and as one more partial in the merge) are constexpr
flags (``HAS_SOFTCAP``, ``HAS_SINKS``): without them the kernels compile to the code they had before.

Verified against the torch reference (``trimix_probe.reference``) under ``TRITON_INTERPRET=1`` at
small shapes and on an H100 and an H200 (see docs/performance.md); other GPUs (Ampere, consumer cards)
not run. The GQA packing: on an H200 only (fp64 reference, GQA 4, odd lengths, 2026-12-04). Softcap
and sinks with packing: verified under the interpreter only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autotune import seq_bucket
from ._inputs import DTYPES, HEAD_DIMS, check_no_grad, check_window, on_device, prepare  # noqa: F401 (DTYPES, HEAD_DIMS: public)
from ._inputs import INTERPRET as _INTERPRET
from ._softmax import (LN2, add_sink, head_coords, load_q_tile, online_softmax, qk_scores, score_scales, softmax_state,
                       store_tile, tile_prologue)
from ._softmax import UPCAST_DOT as _UPCAST_DOT


@triton.jit
def _attn_step(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_d, stride_kn, stride_vn, qk_scale, cap, seq,
               n_init, n_local,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK: tl.constexpr, BAND: tl.constexpr, SINK: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """One key block of online softmax (scores in log2 units, see ``qk_scores``).

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
    s = qk_scores(q, k, qk_scale, cap, HAS_SOFTCAP)  # [BLOCK_M, BLOCK_N]
    if MASK:
        keep = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < seq)
        if SINK:
            keep = keep & (offs_n[None, :] < n_init)
        elif BAND:
            keep = keep & ((offs_n[None, :] < n_init) | (offs_m[:, None] - offs_n[None, :] < n_local))
    else:
        keep = None  # not read: MASK=False folds the whole tile
    return online_softmax(acc, l_i, m_i, s, keep, v, MASK, _UPCAST_DOT)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) the GPU autotunes over (tests/test_kernel.py runs each under
# the interpreter). Band: short loops (~10 key blocks a program), shallow pipelines; BLOCK_M counts
# packed rows. 256 x 64 (GQA 4 packed: 64 positions of 4 heads): 3.65 ms against 4.07 for 128 x 64
# on the band at 128K, H100, 2026-12-07 (docs/performance.md). Last rows: long unmasked loops over a
# chunk, where deeper pipelines pay off. head_dim > 128: the two of ``_prune``.
BAND_SHAPES = ((128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (256, 64, 8, 2))
LAST_SHAPES = ((128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 4), (64, 64, 4, 3))
WIDE_HEAD_SHAPES = ((64, 64, 4, 2), (64, 32, 4, 2))


def _config(shape) -> triton.Config:
    m, n, w, s = shape
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


def _configs(band: bool) -> list[triton.Config]:
    if _INTERPRET:  # the interpreter would run every config: give it one small one
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [_config(shape) for shape in (BAND_SHAPES if band else LAST_SHAPES)]


def keep(conf: triton.Config) -> bool:
    """Drop 8-warp configs on tiles smaller than 64 x 64: two warpgroups then split an MMA too small
    to feed them (the fused-attention tutorial drops the same on Hopper)."""
    return not (conf.num_warps == 8 and conf.kwargs["BLOCK_M"] * conf.kwargs["BLOCK_N"] < 64 * 64)


def _prune(configs, named_args, **kwargs):
    """head_dim 256: a 128-row fp32 accumulator spills, and 3+ stages of 256-wide K/V tiles
    exceed the 228 KB of shared memory of an H100. Padded head_dims (80, 96): two configs, to keep
    the first-call compile short for shapes that are rarely timed. A packed band program needs at
    least one position per head (BLOCK_M >= PACK)."""
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 0))
    pack = kwargs.get("PACK", named_args.get("PACK", 1))
    configs = [c for c in configs if c.kwargs["BLOCK_M"] >= pack] or configs
    if _INTERPRET:
        return configs
    if head_dim > 128:
        return [_config(shape) for shape in WIDE_HEAD_SHAPES]
    if head_dim not in (64, 128):
        return configs[:2]
    return configs


def pack_heads(group: int) -> int:
    """q heads of one kv head that a band program packs into its rows: the largest power of two
    dividing ``group``, at most 8 (GQA 4 -> 4, GQA 7 -> 1). They share every K/V tile, so a tile read
    into shared memory serves ``PACK`` heads, and the rows of the MMA stay at ``BLOCK_M`` while each
    head's window is cut at ``BLOCK_M // PACK`` positions (less of the 2-D window is padding)."""
    return min(group & -group, 8)


_NO_SPEC = ["seq", "seq_bucket", "n_init", "n_local", "row0", "n_last"]  # lengths vary per prompt: no recompiles


@triton.autotune(configs=list(filter(keep, _configs(band=True))), key=["seq_bucket", "HEAD_DIM", "GROUP", "PACK"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=_NO_SPEC[:4])
def _band_kernel(Q, K, V, Out, Lse, Sinks, sm_scale, softcap, seq, seq_bucket, n_init, n_local, heads,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                 GROUP: tl.constexpr, PACK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 SINK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # rows of a program: PACK q heads (of one kv head) x POS positions, head-major; axis 0 is
    # batch * heads / PACK, fastest in launch order: the q heads of one kv head run together
    POS = BLOCK_M // PACK  # constexpr: the modulo and division below are shifts
    bhp = tl.program_id(0)
    m_start = tl.program_id(1) * POS
    offs_r = tl.arange(0, BLOCK_M)
    offs_m = m_start + offs_r % POS  # [BLOCK_M] positions
    h0 = (bhp % (heads // PACK)) * PACK
    b = (bhp // (heads // PACK)).to(tl.int64)
    h = h0 + offs_r // POS  # [BLOCK_M] q head of each row
    offs_d = tl.arange(0, BLOCK_D)
    q = load_q_tile(Q, b, h[:, None], offs_m, offs_d, stride_qb, stride_qh, stride_qm, seq, HEAD_DIM)
    qk_scale, cap = score_scales(sm_scale, softcap, HAS_SOFTCAP)
    kvh = h0 // GROUP
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    acc, l_i, m_i = softmax_state(BLOCK_M, BLOCK_D)

    m_end = tl.minimum(m_start + POS, seq)  # keys j < m_end can be causal for this block
    lo = tl.maximum(m_start - n_local + 1, 0)  # first key in the window of the first row
    lo_blk = (lo // BLOCK_N) * BLOCK_N
    # sink keys before the window, in small blocks (n_init is usually a handful of keys)
    sink_hi = tl.minimum(n_init, lo_blk)
    for start_n in range(0, sink_hi, SINK_N):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_d, stride_kn,
                                   stride_vn, qk_scale, cap, seq, n_init, n_local, SINK_N, HEAD_DIM, BLOCK_D,
                                   True, True, True, HAS_SOFTCAP)
    # window [lo_blk, m_end): masked head blocks (window start cuts the tile), unmasked interior,
    # masked tail blocks (the causal diagonal)
    full_lo = tl.maximum(((m_start + POS - n_local + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, lo_blk)
    full_lo = tl.minimum(full_lo, m_end)
    full_hi = tl.maximum(((m_start + 1) // BLOCK_N) * BLOCK_N, full_lo)
    for start_n in range(lo_blk, full_lo, BLOCK_N):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_d, stride_kn,
                                   stride_vn, qk_scale, cap, seq, n_init, n_local, BLOCK_N, HEAD_DIM, BLOCK_D,
                                   True, True, False, HAS_SOFTCAP)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_d, stride_kn,
                                   stride_vn, qk_scale, cap, seq, n_init, n_local, BLOCK_N, HEAD_DIM, BLOCK_D,
                                   False, True, False, HAS_SOFTCAP)
    for start_n in range(full_hi, m_end, BLOCK_N):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_d, stride_kn,
                                   stride_vn, qk_scale, cap, seq, n_init, n_local, BLOCK_N, HEAD_DIM, BLOCK_D,
                                   True, True, False, HAS_SOFTCAP)
    if HAS_SINKS:  # after the loops: the sink joins the normaliser once, not per tile
        acc, l_i, m_i = add_sink(acc, l_i, m_i, Sinks, h)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    store_tile(Out, acc / l_safe[:, None], b, h[:, None], offs_m, offs_d, stride_ob, stride_oh, stride_om, seq,
               HEAD_DIM)
    lse = (m_i + tl.math.log2(l_safe)) * LN2
    tl.store(Lse + (b * heads + h) * seq + offs_m, lse, mask=offs_m < seq)


@triton.autotune(configs=list(filter(keep, _configs(band=False))), key=["seq_bucket", "HEAD_DIM", "GROUP"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["seq", "seq_bucket", "row0", "n_last"])
def _last_kernel(Q, K, V, PartO, PartLse, sm_scale, softcap, seq, seq_bucket, row0, n_last, heads, chunk, n_chunks,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # partials: PartO [batch * heads, n_chunks, n_last, BLOCK_D] fp32, PartLse [batch * heads, n_chunks, n_last];
    # the sinks join in the merge (once per row, not once per chunk)
    bh = tl.program_id(0)
    c = tl.program_id(1)
    r_start = row0 + tl.program_id(2) * BLOCK_M
    offs_m = r_start + tl.arange(0, BLOCK_M)
    b, h, offs_d, q, qk_scale, cap, k_base, v_base = tile_prologue(
        Q, K, V, bh, heads, offs_m, seq, sm_scale, softcap, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh,
        stride_vb, stride_vh, GROUP, HEAD_DIM, BLOCK_D, HAS_SOFTCAP)
    acc, l_i, m_i = softmax_state(BLOCK_M, BLOCK_D)

    c_lo = c * chunk
    c_hi = tl.minimum(c_lo + chunk, tl.minimum(r_start + BLOCK_M, seq))
    # keys below the first row's position (and inside seq) are kept by every row: no mask
    full_hi = tl.maximum(tl.minimum(((r_start + 1) // BLOCK_N) * BLOCK_N, c_hi), c_lo)
    for start_n in range(c_lo, full_hi, BLOCK_N):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_d, stride_kn,
                                   stride_vn, qk_scale, cap, seq, 0, 0, BLOCK_N, HEAD_DIM, BLOCK_D,
                                   False, False, False, HAS_SOFTCAP)
    for start_n in range(full_hi, c_hi, BLOCK_N):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_d, stride_kn,
                                   stride_vn, qk_scale, cap, seq, 0, 0, BLOCK_N, HEAD_DIM, BLOCK_D,
                                   True, False, False, HAS_SOFTCAP)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    # a chunk wholly above the diagonal leaves l = 0: its lse is -inf and the merge skips it
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    rows = offs_m - row0
    part = bh * n_chunks + c
    o_ptrs = PartO + (part * n_last + rows[:, None]) * BLOCK_D + offs_d[None, :]
    tl.store(o_ptrs, out, mask=rows[:, None] < n_last)
    tl.store(PartLse + part * n_last + rows, lse, mask=rows < n_last)


@triton.jit
def _merge_kernel(PartO, PartLse, Out, Lse, Sinks, seq, row0, n_last, heads, n_chunks, stride_ob, stride_oh,
                  stride_om, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  HAS_SINKS: tl.constexpr):
    bh = tl.program_id(0)
    b, h, _ = head_coords(bh, heads, 1)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < n_last
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_SINKS:  # the sink is one more partial: lse = sink (natural units), output 0
        s_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(Sinks + h)
    else:
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
    pos = row0 + rows
    store_tile(Out, acc / s_safe[:, None], b, h, pos, offs_d, stride_ob, stride_oh, stride_om, seq, HEAD_DIM)
    tl.store(Lse + bh * seq + pos, m_i + tl.log(s_safe), mask=rmask)


def _chunk(seq: int) -> int:
    """Keys per split-K program for the last rows: ~32 chunks a head, each at least 512 keys
    (a multiple of every BLOCK_N)."""
    if _INTERPRET:
        return 32
    return min(max(seq_bucket(seq) // 32, 512), 4096)


def triangle_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, n_init: int = 8, n_local: int = 512,
                       last_n: int = 128, scale: float | None = None, return_lse: bool = False,
                       softcap: float | None = None, sinks: torch.Tensor | None = None, pack: int | None = None):
    """Triangle attention. q: [batch, heads, seq, head_dim]; k, v: [batch, kv_heads, seq, head_dim]
    (heads a multiple of kv_heads; any strides with a unit head_dim stride, else copied).

    Row i attends to keys j <= i with j < n_init or i - j < n_local; rows i >= seq - last_n attend
    to every j <= i. Returns out [batch, heads, seq, head_dim] in q's dtype, and with
    ``return_lse`` also lse [batch, heads, seq] fp32 (natural log of the sum of exp of the scaled
    scores). bf16/fp16, head_dim 64, 80, 96, 128, 256; CUDA, or CPU under TRITON_INTERPRET=1.

    ``softcap`` (Gemma-2's ``attn_logit_softcapping``): the scaled scores become
    ``softcap * tanh(scores / softcap)`` before the mask. ``sinks`` [heads] (gpt-oss's ``s_aux``, one
    logit per q head, natural units): ``exp(sinks[h])`` joins each row's softmax denominator, with no
    value; the returned lse includes it. Both as in :func:`trimix_probe.reference.masked_attention`.

    ``pack``: q heads of one kv head per band program (None: :func:`pack_heads`; 1: one head a
    program, the layout before GQA packing; kept for benchmarks and tests). A power of two dividing
    heads // kv_heads, at most 8.
    """
    q, k, v, out, scale, softcap_, sinks_, block_d = prepare("triangle_attention", q, k, v, scale=scale,
                                                             softcap=softcap, sinks=sinks)
    # shape constraints (ValueErrors, not asserts, so they hold under python -O)
    check_window("triangle_attention", n_init, n_local, last_n)
    check_no_grad("triangle_attention", q, k, v)
    batch, heads, seq, head_dim = q.shape
    kv_heads = k.shape[1]
    lse = torch.empty((batch, heads, seq), device=q.device, dtype=torch.float32)
    if seq == 0 or batch == 0:
        return (out, lse) if return_lse else out
    group = heads // kv_heads
    if pack is not None and (pack not in (1, 2, 4, 8) or group % pack):
        raise ValueError(f"triangle_attention: pack {pack!r}; accepted: None or a power of two <= 8 dividing "
                         f"heads // kv_heads = {group}")
    bucket = seq_bucket(seq)
    n_last = min(last_n, seq)
    row0 = seq - n_last
    has_softcap, has_sinks = softcap is not None, sinks is not None
    sink_ptr = sinks_ if has_sinks else lse  # not read without sinks (HAS_SINKS=False)
    with on_device(q):
        if row0 > 0:  # rows before the last ones; when every row is a last row the band is skipped
            pack = pack_heads(group) if pack is None else pack
            grid = lambda meta: (batch * heads // pack, triton.cdiv(row0, meta["BLOCK_M"] // pack))  # noqa: E731
            _band_kernel[grid](q, k, v, out, lse, sink_ptr, scale, softcap_, seq, bucket, n_init, n_local, heads,
                               *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                               GROUP=group, PACK=pack, HEAD_DIM=head_dim, BLOCK_D=block_d, SINK_N=16,
                               HAS_SOFTCAP=has_softcap, HAS_SINKS=has_sinks)
        if n_last > 0:
            chunk = _chunk(seq)
            n_chunks = triton.cdiv(seq, chunk)
            part_o = torch.empty((batch * heads, n_chunks, n_last, block_d), device=q.device, dtype=torch.float32)
            part_lse = torch.empty((batch * heads, n_chunks, n_last), device=q.device, dtype=torch.float32)
            grid = lambda meta: (batch * heads, n_chunks, triton.cdiv(n_last, meta["BLOCK_M"]))  # noqa: E731
            _last_kernel[grid](q, k, v, part_o, part_lse, scale, softcap_, seq, bucket, row0, n_last, heads, chunk,
                               n_chunks, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                               GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, HAS_SOFTCAP=has_softcap)
            merge_m = 16 if _INTERPRET else 32
            _merge_kernel[(batch * heads, triton.cdiv(n_last, merge_m))](
                part_o, part_lse, out, lse, sink_ptr, seq, row0, n_last, heads, n_chunks, *out.stride()[:3],
                HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=merge_m, HAS_SINKS=has_sinks)
    return (out, lse) if return_lse else out
