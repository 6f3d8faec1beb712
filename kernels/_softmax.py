"""The online-softmax step every attention kernel here folds its tiles with, and the interpreter's
dot workaround they share."""

from __future__ import annotations

import triton
import triton.language as tl

from ._inputs import INTERPRET

# Triton's interpreter (3.9) returns garbage from a bf16 x bf16 tl.dot; upcasting the operands to
# fp32 there is exact (bf16 products fit in fp32) and matches the tensor cores' fp32 accumulation.
UPCAST_DOT = tl.constexpr(INTERPRET)


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
