"""What every attention kernel here shares inside the kernel: the tile prologue (head coordinates,
the q tile, the K/V bases), the scores (scale, optional softcap), the online-softmax step, the
sink term and the epilogue store; plus the log2 constants and the interpreter's dot workaround.

Scores are kept in log2 units (``exp2`` is the hardware's exponential): natural-unit logits times
``LOG2E``, and an LSE back in natural units times ``LN2``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._inputs import INTERPRET

LOG2E = tl.constexpr(1.4426950408889634)  # 1/ln(2): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): log(x) = log2(x) * LN2

# Triton's interpreter (3.9) returns garbage from a bf16 x bf16 tl.dot; upcasting the operands to
# fp32 there is exact (bf16 products fit in fp32) and matches the tensor cores' fp32 accumulation.
UPCAST_DOT = tl.constexpr(INTERPRET)


@triton.jit
def head_coords(bh, heads, GROUP: tl.constexpr):
    """(batch as int64, q head, kv head) of program row ``bh = batch * heads + head``. 64-bit batch:
    batch * heads * seq * head_dim passes 2**31 at batch 4, seq 128K."""
    h = bh % heads
    return (bh // heads).to(tl.int64), h, h // GROUP


@triton.jit
def load_q_tile(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qm, seq, HEAD_DIM: tl.constexpr):
    """The [M, BLOCK_D] q tile of rows ``offs_m`` (zeros past ``seq`` and past ``HEAD_DIM``)."""
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < seq) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    return q


@triton.jit
def tile_prologue(Q, K, V, bh, heads, offs_m, seq, sm_scale, softcap, stride_qb, stride_qh, stride_qm,
                  stride_kb, stride_kh, stride_vb, stride_vh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """What every kernel computes before its key loop, for program row ``bh`` and query rows
    ``offs_m``: (b, h, offs_d, q tile, qk_scale, cap, K base, V base of kv head ``h // GROUP``)."""
    b, h, kvh = head_coords(bh, heads, GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_q_tile(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qm, seq, HEAD_DIM)
    qk_scale, cap = score_scales(sm_scale, softcap, HAS_SOFTCAP)
    return b, h, offs_d, q, qk_scale, cap, K + b * stride_kb + kvh * stride_kh, V + b * stride_vb + kvh * stride_vh


@triton.jit
def softmax_state(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Empty running (acc, l, m) of the online softmax."""
    return (tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), tl.zeros([BLOCK_M], dtype=tl.float32),
            tl.full([BLOCK_M], float("-inf"), dtype=tl.float32))


@triton.jit
def score_scales(sm_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """(qk_scale, cap) for :func:`qk_scores`. Without softcap the scale folds LOG2E in (one multiply
    per score); with it the tanh needs natural units, so LOG2E moves into ``cap``."""
    if HAS_SOFTCAP:
        qk_scale = sm_scale / softcap
        cap = softcap * LOG2E
    else:
        qk_scale = sm_scale * LOG2E
        cap = softcap
    return qk_scale, cap


@triton.jit
def tanh(x):
    # tanh from exp2 (no libdevice call, so the interpreter runs it too); saturates to +-1 for large |x|
    e = tl.math.exp2(x * (2.0 * LOG2E))
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def qk_scores(q, k, qk_scale, cap, HAS_SOFTCAP: tl.constexpr):
    """Scores in log2 units of a q tile [M, D] and a K^T tile [D, N]: ``scale * q k^T * LOG2E``, or
    with softcap ``softcap * tanh(scale * q k^T / softcap) * LOG2E``. The scale is applied to the fp32
    scores rather than to q, which would add a rounding of q in bf16."""
    if UPCAST_DOT:
        s = tl.dot(q, k.to(tl.float32))
    else:
        s = tl.dot(q, k)
    if HAS_SOFTCAP:
        s = tanh(s * qk_scale) * cap
    else:
        s = s * qk_scale
    return s


@triton.jit
def online_softmax(acc, l_i, m_i, s, keep, v, MASKED: tl.constexpr, UPCAST: tl.constexpr):
    """Fold one [M, N] tile of log2-scaled scores ``s`` (values ``v`` [N, D]) into the running
    (acc, l, m). ``MASKED``: drop the entries where ``keep`` is False; otherwise every entry counts
    and ``keep`` is not read (interior tiles of a causal band: no compare, no select)."""
    if MASKED:
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with no kept key so far has m_new = -inf: subtract 0 instead so exp2 gives 0, not NaN
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = m_new
    p = tl.math.exp2(s - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    if UPCAST:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def add_sink(acc, l_i, m_i, Sinks, h):
    """Fold head ``h``'s sink logit (natural units, ``Sinks`` [heads] fp32) into the running
    (acc, l, m) as one more key whose value is zero: it joins the denominator only."""
    sink = tl.load(Sinks + h) * LOG2E
    m_new = tl.maximum(m_i, sink)
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_sub)
    return acc * alpha[:, None], l_i * alpha + tl.math.exp2(sink - m_sub), m_new


@triton.jit
def store_tile(Out, out, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_om, seq, HEAD_DIM: tl.constexpr):
    """Store an fp32 [M, BLOCK_D] output tile in Out's dtype (rows < seq, columns < HEAD_DIM)."""
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < seq) & (offs_d[None, :] < HEAD_DIM))
