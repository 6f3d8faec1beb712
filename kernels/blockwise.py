"""Block-sparse prefill attention in Triton (FlexPrefill-style), exact on the kept blocks.

Per (batch, head, query block ``m``) a sorted list of key blocks from
:func:`trimix_probe.dynamic.select_blockwise`; row ``i`` of block ``m`` keeps key ``j`` iff ``j <= i``
and ``j // B`` is in the list of ``m`` (``B = block_size``). One program per (query block, head)
walks its list; only the diagonal block needs the causal mask.

GQA reads K/V of kv head ``h // group`` through strides (no copy); query blocks run heaviest
(last) first. Softcap and sinks as in the triangle kernel (constexpr flags ``HAS_SOFTCAP``,
``HAS_SINKS``). Verified against the torch reference (``trimix_probe.dynamic``) under
``TRITON_INTERPRET=1`` at small shapes and on an H100 and an H200 (see docs/performance.md); other GPUs
not run. Softcap and sinks: verified under the interpreter only (tests/test_kernel.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autotune import block_sparse_configs, prune_block_sparse, seq_bucket
from ._inputs import on_device, prepare
from ._softmax import add_sink, online_softmax, qk_scores, softmax_state, store_tile, tile_prologue
from ._softmax import UPCAST_DOT as _UPCAST_DOT


@triton.jit
def _block_step(acc, l_i, m_i, q, k_base, v_base, n, offs_m, offs_d, stride_kn, stride_vn, qk_scale, cap, seq,
                HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """One kept key block ``n`` of online softmax; scores in log2 units."""
    offs_n = n * BLOCK + tl.arange(0, BLOCK)
    nmask = offs_n < seq
    dmask = offs_d < HEAD_DIM
    k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=nmask[None, :] & dmask[:, None],
                other=0.0)  # [BLOCK_D, BLOCK], K^T
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=nmask[:, None] & dmask[None, :],
                other=0.0)
    s = qk_scores(q, k, qk_scale, cap, HAS_SOFTCAP)
    # causal: only the diagonal block cuts a tile, the mask costs a compare and a select per element
    return online_softmax(acc, l_i, m_i, s, offs_n[None, :] <= offs_m[:, None], v, True, _UPCAST_DOT)


@triton.autotune(configs=block_sparse_configs(), key=["seq_bucket", "HEAD_DIM", "BLOCK", "GROUP"],
                 prune_configs_by={"early_config_prune": prune_block_sparse})
@triton.jit(do_not_specialize=["seq", "seq_bucket", "n_qblocks"])
def _blockwise_kernel(Q, K, V, Out, Sinks, Blocks, Count, sm_scale, softcap, seq, seq_bucket, n_qblocks, heads,
                      stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                      GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
                      HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr):
    # Blocks [batch*heads, n_qblocks, n_qblocks]: kept key blocks of query block m, sorted, first
    # Count[bh, m] valid
    bh = tl.program_id(0)
    m = n_qblocks - 1 - tl.program_id(1)  # heaviest query blocks first: better tail balance
    offs_m = m * BLOCK + tl.arange(0, BLOCK)
    # 64-bit table row: batch * heads * n_qblocks**2 passes 2**31 at 32 heads, seq 1M
    row = (bh.to(tl.int64) * n_qblocks + m)
    b, h, offs_d, q, qk_scale, cap, k_base, v_base = tile_prologue(
        Q, K, V, bh, heads, offs_m, seq, sm_scale, softcap, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh,
        stride_vb, stride_vh, GROUP, HEAD_DIM, BLOCK_D, HAS_SOFTCAP)
    acc, l_i, m_i = softmax_state(BLOCK, BLOCK_D)
    count = tl.load(Count + row)
    for t in range(0, count):
        n = tl.load(Blocks + row * n_qblocks + t)
        acc, l_i, m_i = _block_step(acc, l_i, m_i, q, k_base, v_base, n, offs_m, offs_d, stride_kn, stride_vn,
                                    qk_scale, cap, seq, HEAD_DIM, BLOCK, HAS_SOFTCAP)
    if HAS_SINKS:
        acc, l_i, m_i = add_sink(acc, l_i, m_i, Sinks, h)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    store_tile(Out, acc / l_safe[:, None], b, h, offs_m, offs_d, stride_ob, stride_oh, stride_om, seq, HEAD_DIM)


def blockwise_indices(keep_blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep_blocks: [batch, heads, n_qblocks, n_kblocks] bool -> (blocks [bh, n_qblocks, n_kblocks] int32,
    the kept key blocks of each query block sorted first; count [bh, n_qblocks] int32). No host sync."""
    batch, heads, nq, nk = keep_blocks.shape
    flat = keep_blocks.reshape(batch * heads, nq, nk)
    idx = torch.arange(nk, device=flat.device, dtype=torch.int32)
    blocks = torch.where(flat, idx, nk).sort(dim=-1).values.to(torch.int32).contiguous()
    return blocks, flat.sum(-1, dtype=torch.int32).contiguous()


def blockwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep_blocks: torch.Tensor, *,
                        block_size: int = 128, scale: float | None = None, softcap: float | None = None,
                        sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Block-sparse causal attention (prefill).

    q: [batch, heads, seq, head_dim]; k, v: [batch, kv_heads, seq, head_dim] (heads a multiple of
    kv_heads); keep_blocks: [batch, heads, n_blocks, n_blocks] bool with n_blocks = cdiv(seq,
    block_size) (as from ``select_blockwise``). Row i keeps key j <= i iff keep_blocks[..., i // B,
    j // B]. A row that keeps nothing gets zeros. Returns out [batch, heads, seq, head_dim] in q's
    dtype. bf16/fp16, head_dim 64, 80, 96, 128, 256, block_size 16, 32, 64, 128; CUDA, or CPU under
    TRITON_INTERPRET=1.

    ``softcap`` and ``sinks`` [heads]: honoured, as in :func:`trimix_probe.reference.masked_attention`
    (tanh cap on the scaled scores; a sink logit per q head in the denominator).
    """
    q, k, v, out, scale, softcap_, sinks_, block_d = prepare("blockwise_attention", q, k, v, scale=scale,
                                                             softcap=softcap, sinks=sinks, block_size=block_size)
    # shape constraints
    batch, heads, seq, head_dim = q.shape
    kv_heads = k.shape[1]
    n_blocks = triton.cdiv(seq, block_size)
    if keep_blocks.shape != (batch, heads, n_blocks, n_blocks) or keep_blocks.dtype != torch.bool:
        raise ValueError(f"blockwise_attention: keep_blocks must be bool [{batch}, {heads}, {n_blocks}, {n_blocks}], "
                         f"got {keep_blocks.dtype} {tuple(keep_blocks.shape)}")
    if seq == 0 or batch == 0:
        return out
    # blocks above the diagonal hold no causal entry: drop them so the kernel never visits them
    causal = torch.ones(n_blocks, n_blocks, dtype=torch.bool, device=q.device).tril()
    blocks, count = blockwise_indices(keep_blocks & causal)
    grid = (batch * heads, n_blocks)
    with on_device(q):
        _blockwise_kernel[grid](
            q, k, v, out, out if sinks_ is None else sinks_,  # Sinks not read without sinks (HAS_SINKS=False)
            blocks, count, scale, softcap_, seq, seq_bucket(seq), n_blocks, heads,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            GROUP=heads // kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK=block_size,
            HAS_SOFTCAP=softcap is not None, HAS_SINKS=sinks is not None)
    return out
