"""Vertical-slash sparse prefill attention in Triton (MInference-style), exact on the kept entries.

Per (batch, head) a selection ``(columns, bands)`` from :func:`trimix_probe.dynamic.select_vertical_slash`
says which entries are kept. With ``B = block_size`` and causal ``j <= i``, row ``i`` keeps key ``j`` iff

    j in columns[b, h]                  (vertical: whole key columns, the sinks among them)
    or (i - j) // B in bands[b, h]      (slash: band ``o`` is the diagonals i - j in [o*B, (o+1)*B))

Slash diagonals are selected in bands of ``B`` neighbours so that the kernel works on tiles: query
block ``m`` meets band ``o`` in key blocks ``m - o`` (diagonals >= o*B) and ``m - o - 1`` (diagonals
< (o+1)*B), so one program per (query block, head) visits the key blocks ``m - o`` for ``o`` in
``bands | bands + 1`` and masks each element with two per-tile flags (band ``o`` kept, band ``o - 1``
kept): no per-element lookup. Those tiles skip the vertical columns (a ``[BLOCK]`` flag load), which a
second loop gathers by index, ``BLOCK_C`` columns at a time, with only the causal mask: every kept
entry is counted once.

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
from ._inputs import BLOCK_SIZES, DTYPES, HEAD_DIMS, on_device, prepare  # noqa: F401 (public)
from ._inputs import INTERPRET as _INTERPRET
from ._softmax import add_sink, online_softmax, qk_scores, softmax_state, store_tile, tile_prologue
from ._softmax import UPCAST_DOT as _UPCAST_DOT


@triton.autotune(configs=block_sparse_configs(), key=["seq_bucket", "HEAD_DIM", "BLOCK", "GROUP"],
                 prune_configs_by={"early_config_prune": prune_block_sparse})
@triton.jit(do_not_specialize=["seq", "seq_bucket", "n_qblocks", "max_tiles", "max_cols", "n_flags"])
def _vertical_slash_kernel(Q, K, V, Out, Sinks, TileOff, TileCnt, BandFlag, IsCol, Cols, ColCnt,
                           sm_scale, softcap, seq, seq_bucket, n_qblocks, max_tiles, max_cols, n_flags, heads,
                           stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                           stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                           GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
                           HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr):
    # TileOff [batch*heads, max_tiles]: sorted tile offsets o (key block m - o); TileCnt [batch*heads,
    # n_qblocks]: how many of them apply to query block m; BandFlag [batch*heads, n_flags]: band o-1
    # kept at index o (index 0 is band -1: never); IsCol [batch*heads, seq]; Cols [batch*heads,
    # max_cols] sorted; ColCnt [batch*heads, n_qblocks]: columns below the block's end.
    bh = tl.program_id(0)
    m = n_qblocks - 1 - tl.program_id(1)  # heaviest query blocks first: better tail balance
    offs_m = m * BLOCK + tl.arange(0, BLOCK)
    bh64 = bh.to(tl.int64)  # 64-bit table rows
    b, h, offs_d, q, qk_scale, cap, k_base, v_base = tile_prologue(
        Q, K, V, bh, heads, offs_m, seq, sm_scale, softcap, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh,
        stride_vb, stride_vh, GROUP, HEAD_DIM, BLOCK_D, HAS_SOFTCAP)
    dmask = offs_d < HEAD_DIM
    acc, l_i, m_i = softmax_state(BLOCK, BLOCK_D)

    # slash: key blocks m - o, element mask from the two bands that cross the tile
    n_tiles = tl.load(TileCnt + bh64 * n_qblocks + m)
    for t in range(0, n_tiles):
        o = tl.load(TileOff + bh64 * max_tiles + t)
        upper = tl.load(BandFlag + bh64 * n_flags + o + 1) != 0  # band o: diagonals >= o * BLOCK
        lower = tl.load(BandFlag + bh64 * n_flags + o) != 0  # band o - 1: diagonals < o * BLOCK
        offs_n = (m - o) * BLOCK + tl.arange(0, BLOCK)
        nmask = offs_n < seq
        k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=nmask[None, :] & dmask[:, None],
                    other=0.0)  # [BLOCK_D, BLOCK], K^T
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=nmask[:, None] & dmask[None, :],
                    other=0.0)
        s = qk_scores(q, k, qk_scale, cap, HAS_SOFTCAP)
        diag = offs_m[:, None] - offs_n[None, :]
        in_upper = diag >= o * BLOCK
        keep = (diag >= 0) & ((in_upper & upper) | (~in_upper & lower))
        # vertical columns are counted by the column loop below, not here
        is_col = tl.load(IsCol + bh64 * seq + offs_n, mask=nmask, other=1)
        keep = keep & (is_col == 0)[None, :]
        acc, l_i, m_i = online_softmax(acc, l_i, m_i, s, keep, v, True, _UPCAST_DOT)

    # vertical: gathered key columns, causal mask only
    n_cols = tl.load(ColCnt + bh64 * n_qblocks + m)
    for c0 in range(0, n_cols, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cmask = offs_c < n_cols
        cols = tl.load(Cols + bh64 * max_cols + offs_c, mask=cmask, other=0)
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=cmask[None, :] & dmask[:, None],
                    other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=cmask[:, None] & dmask[None, :],
                    other=0.0)
        s = qk_scores(q, k, qk_scale, cap, HAS_SOFTCAP)
        keep = cmask[None, :] & (cols[None, :] <= offs_m[:, None])
        acc, l_i, m_i = online_softmax(acc, l_i, m_i, s, keep, v, True, _UPCAST_DOT)
    if HAS_SINKS:
        acc, l_i, m_i = add_sink(acc, l_i, m_i, Sinks, h)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    store_tile(Out, acc / l_safe[:, None], b, h, offs_m, offs_d, stride_ob, stride_oh, stride_om, seq, HEAD_DIM)


def vertical_slash_indices(columns: torch.Tensor, bands: torch.Tensor, seq: int, block_size: int):
    """The kernel's tables for a selection; pure torch, no host sync.

    columns: [batch, heads, n_cols] sorted key indices; bands: [batch, heads, n_bands] sorted band
    indices. Returns (tile_off [bh, max_tiles], tile_cnt [bh, n_qblocks], band_flag [bh, n_flags] int8,
    is_col [bh, seq] int8, cols [bh, n_cols] int32, col_cnt [bh, n_qblocks]) with bh = batch * heads.
    """
    batch, heads = columns.shape[:2]
    dev = columns.device
    n_qblocks = triton.cdiv(seq, block_size)
    # band_flag[o + 1] = band o kept; index 0 stands for band -1 (never kept)
    band_flag = torch.zeros(batch * heads, n_qblocks + 1, dtype=torch.int8, device=dev)
    band_flag.scatter_(1, bands.reshape(batch * heads, -1).long() + 1, 1)
    # tiles at offset o hold band o (upper part) or band o - 1 (lower part)
    has_tile = (band_flag[:, 1:] | band_flag[:, :-1]).bool()  # [bh, n_qblocks], offset o
    offsets = torch.arange(n_qblocks, device=dev, dtype=torch.int32).expand_as(has_tile)
    tile_off = torch.where(has_tile, offsets, n_qblocks).sort(dim=1).values.to(torch.int32).contiguous()
    # query block m visits the offsets o <= m
    qblocks = torch.arange(n_qblocks, device=dev, dtype=torch.int32).expand(batch * heads, n_qblocks).contiguous()
    tile_cnt = torch.searchsorted(tile_off, qblocks, right=True).to(torch.int32)
    cols = columns.reshape(batch * heads, -1).to(torch.int32).contiguous()
    is_col = torch.zeros(batch * heads, seq, dtype=torch.int8, device=dev)
    is_col.scatter_(1, cols.long(), 1)
    ends = ((qblocks + 1) * block_size).contiguous()
    col_cnt = torch.searchsorted(cols, ends, right=False).to(torch.int32)
    return tile_off, tile_cnt, band_flag, is_col, cols, col_cnt


def vertical_slash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, columns: torch.Tensor,
                             bands: torch.Tensor, *, block_size: int = 64, scale: float | None = None,
                             softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Vertical-slash sparse causal attention (prefill).

    q: [batch, heads, seq, head_dim]; k, v: [batch, kv_heads, seq, head_dim] (heads a multiple of
    kv_heads); columns: [batch, heads, n_cols] distinct key indices in [0, seq); bands: [batch, heads,
    n_bands] band indices in [0, cdiv(seq, block_size)) (both as from ``select_vertical_slash``). Row i
    keeps key j <= i iff j is a column or (i - j) // block_size is a band. A row that keeps nothing gets
    zeros. Returns out [batch, heads, seq, head_dim] in q's dtype. bf16/fp16, head_dim 64, 80, 96, 128,
    256, block_size 16, 32, 64, 128; CUDA, or CPU under TRITON_INTERPRET=1.

    ``softcap`` and ``sinks`` [heads]: honoured, as in :func:`trimix_probe.reference.masked_attention`
    (tanh cap on the scaled scores; a sink logit per q head in the denominator).
    """
    q, k, v, out, scale, softcap_, sinks_, block_d = prepare("vertical_slash_attention", q, k, v, scale=scale,
                                                             softcap=softcap, sinks=sinks, block_size=block_size)
    # shape constraints
    batch, heads, seq, head_dim = q.shape
    kv_heads = k.shape[1]
    assert columns.dim() == 3 and columns.shape[:2] == (batch, heads), "columns: [batch, heads, n_cols]"
    assert bands.dim() == 3 and bands.shape[:2] == (batch, heads), "bands: [batch, heads, n_bands]"
    if seq == 0 or batch == 0:
        return out
    columns = columns.sort(dim=-1).values
    tile_off, tile_cnt, band_flag, is_col, cols, col_cnt = vertical_slash_indices(columns, bands, seq, block_size)
    n_qblocks = tile_cnt.shape[1]
    block_c = 16 if _INTERPRET else 64
    grid = (batch * heads, n_qblocks)
    with on_device(q):
        _vertical_slash_kernel[grid](
            q, k, v, out, out if sinks_ is None else sinks_,  # Sinks not read without sinks (HAS_SINKS=False)
            tile_off, tile_cnt, band_flag, is_col, cols, col_cnt,
            scale, softcap_, seq, seq_bucket(seq), n_qblocks, tile_off.shape[1], cols.shape[1], band_flag.shape[1],
            heads, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            GROUP=heads // kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK=block_size, BLOCK_C=block_c,
            HAS_SOFTCAP=softcap is not None, HAS_SINKS=sinks is not None)
    return out
