"""VARIANT for the issue-25 sweep (not the shipped kernel): the slash loop takes two key tiles a step.

Vertical-slash sparse prefill attention in Triton (MInference-style), exact on the kept entries.

Per (batch, head) a selection ``(columns, bands)`` from :func:`trimix_probe.dynamic.select_vertical_slash`
says which entries are kept. With ``B = block_size`` and causal ``j <= i``, row ``i`` keeps key ``j`` iff

    j in columns[b, h]                  (vertical: whole key columns, the sinks among them)
    or (i - j) // B in bands[b, h]      (slash: band ``o`` is the diagonals i - j in [o*B, (o+1)*B))

Slash diagonals are selected in bands of ``B`` neighbours so that the kernel works on tiles. A
program owns a query tile of ``TILE`` rows (``TILE`` divides ``B``; :func:`default_tile`) and visits
the key tiles ``m - d`` at the tile offsets ``d`` that meet a kept band: band ``o`` meets
``B / TILE + 1`` of them, the same offsets for every query tile, so one sorted table per head serves
all (``d <= m``). A tile's diagonals straddle at most one band boundary, at ``d * TILE``, so two flags
(packed with ``d`` in one code) make the kept diagonals one interval and the element mask two
compares against per-key bounds: no per-element lookup. Those tiles skip the vertical columns (a
``[TILE]`` flag load), which a second loop gathers by index, ``BLOCK_C`` columns at a time, with only
the causal mask: every kept entry is counted once. Smaller tiles waste less of a band's tiles (an
isolated band fills 1/2 of 128-wide tiles, 2/3 of 64-wide ones); at 128K the kernel is bound by
loading those tiles (docs/performance.md, issue 25): a band's key tile serves one query tile only.

GQA reads K/V of kv head ``h // group`` through strides (no copy); the grid runs one kv head's
q heads and query tiles together, heaviest (last) tiles first, so those K/V tiles are reused from L2.
Softcap and sinks as in the triangle kernel (constexpr flags ``HAS_SOFTCAP``, ``HAS_SINKS``). Verified
against the torch reference (``trimix_probe.dynamic``) under ``TRITON_INTERPRET=1`` at small shapes
and on an H100 and an H200 (see docs/performance.md); other GPUs not run. Tiles below the block size
(64 for block 128): on an H200 (2026-12-04) and under the interpreter. Softcap and sinks: verified
under the interpreter only (tests/test_kernel.py).
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

NEVER = tl.constexpr(1 << 30)  # a position past any sequence (and 2**30 + seq stays an int32)


@triton.autotune(configs=block_sparse_configs(), key=["seq_bucket", "HEAD_DIM", "BLOCK", "TILE", "GROUP"],
                 prune_configs_by={"early_config_prune": prune_block_sparse})
@triton.jit(do_not_specialize=["seq", "seq_bucket", "n_qtiles", "max_tiles", "max_cols"])
def _vertical_slash_kernel(Q, K, V, Out, Sinks, TileCode, TileCnt, IsCol, Cols, ColCnt,
                           sm_scale, softcap, seq, seq_bucket, n_qtiles, max_tiles, max_cols, heads,
                           stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                           stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                           GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK: tl.constexpr, TILE: tl.constexpr, BLOCK_C: tl.constexpr,
                           HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr):
    # TileCode [batch*heads, max_tiles]: sorted codes d << 2 | upper << 1 | lower of the tile offsets d
    # (key tile m - d of query tile m, in TILE units) that meet a kept band; TileCnt [batch*heads,
    # n_qtiles]: how many of them apply to query tile m (d <= m); IsCol [batch*heads, seq]; Cols
    # [batch*heads, max_cols] sorted; ColCnt [batch*heads, n_qtiles]: columns below the tile's end.
    # grid (n_qtiles * GROUP, batch * kv_heads): the q heads of one kv head side by side, then the query
    # tiles, heaviest (last) first, kv head by kv head. The programs resident at once then share one kv
    # head's K/V, whose slash tiles (key tile m - d serves query tile m only) neighbouring query tiles
    # reuse out of L2; head-fastest over all heads streamed every kv head's K/V at once (issue 25)
    g = tl.program_id(0) % GROUP
    m = n_qtiles - 1 - tl.program_id(0) // GROUP
    bkv = tl.program_id(1)
    bh = (bkv // (heads // GROUP)) * heads + (bkv % (heads // GROUP)) * GROUP + g
    offs_m = m * TILE + tl.arange(0, TILE)
    bh64 = bh.to(tl.int64)  # 64-bit table rows
    b, h, offs_d, q, qk_scale, cap, k_base, v_base = tile_prologue(
        Q, K, V, bh, heads, offs_m, seq, sm_scale, softcap, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh,
        stride_vb, stride_vh, GROUP, HEAD_DIM, BLOCK_D, HAS_SOFTCAP)
    dmask = offs_d < HEAD_DIM
    acc, l_i, m_i = softmax_state(TILE, BLOCK_D)

    # slash: key tiles m - d. A tile's diagonals i - j lie in (d*TILE - TILE, d*TILE + TILE), which
    # holds at most one band boundary (TILE divides BLOCK), at d*TILE: one flag above it, one below
    # (equal when there is none), packed with d in one code (one scalar load a tile, not three)
    n_tiles = tl.load(TileCnt + bh64 * n_qtiles + m)
    # (variant) two slash tiles a step: keys [TILE of m - d0 | TILE of m - d1] as one [2*TILE] gathered
    # key tile, so the MMAs are N = 2*TILE wide and the softmax rescale runs once per two tiles
    jj = tl.arange(0, 2 * TILE)
    second = jj >= TILE
    within = jj % TILE
    for t in range(0, n_tiles, 2):
        code0 = tl.load(TileCode + bh64 * max_tiles + t)
        code1 = tl.load(TileCode + bh64 * max_tiles + t + 1, mask=t + 1 < n_tiles, other=0)
        code = tl.where(second, code1, code0)  # [2*TILE]: each key's tile code
        d = code >> 2
        upper = (code & 2) != 0
        lower = (code & 1) != 0
        offs_n = (m - d) * TILE + within
        live = jj < (n_tiles - t) * TILE  # no second tile in the last step: its half masked out
        nmask = (offs_n < seq) & live
        k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=nmask[None, :] & dmask[:, None],
                    other=0.0)  # [BLOCK_D, 2*TILE], K^T
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=nmask[:, None] & dmask[None, :],
                    other=0.0)
        s = qk_scores(q, k, qk_scale, cap, HAS_SOFTCAP)
        lo = tl.where(lower, 0, d * TILE)
        hi = tl.where(upper, NEVER, d * TILE)
        is_col = tl.load(IsCol + bh64 * seq + offs_n, mask=nmask, other=1)
        lo_n = tl.where((is_col != 0) | (live == 0), NEVER, offs_n + lo)
        keep = (offs_m[:, None] >= lo_n[None, :]) & (offs_m[:, None] < (offs_n + hi)[None, :])
        acc, l_i, m_i = online_softmax(acc, l_i, m_i, s, keep, v, True, _UPCAST_DOT)

    # vertical: gathered key columns, causal mask only
    n_cols = tl.load(ColCnt + bh64 * n_qtiles + m)
    for c0 in range(0, n_cols, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cmask = offs_c < n_cols
        cols = tl.load(Cols + bh64 * max_cols + offs_c, mask=cmask, other=0)
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=cmask[None, :] & dmask[:, None],
                    other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=cmask[:, None] & dmask[None, :],
                    other=0.0)
        s = qk_scores(q, k, qk_scale, cap, HAS_SOFTCAP)
        keep = tl.where(cmask, cols, NEVER)[None, :] <= offs_m[:, None]  # past n_cols: no row keeps it
        acc, l_i, m_i = online_softmax(acc, l_i, m_i, s, keep, v, True, _UPCAST_DOT)
    if HAS_SINKS:
        acc, l_i, m_i = add_sink(acc, l_i, m_i, Sinks, h)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    store_tile(Out, acc / l_safe[:, None], b, h, offs_m, offs_d, stride_ob, stride_oh, stride_om, seq, HEAD_DIM)


def vertical_slash_indices(columns: torch.Tensor, bands: torch.Tensor, seq: int, block_size: int,
                           tile: int | None = None):
    """The kernel's tables for a selection; pure torch, no host sync.

    columns: [batch, heads, n_cols] sorted key indices; bands: [batch, heads, n_bands] sorted band
    indices; ``tile`` (default ``block_size``) divides ``block_size``. Returns (tile_code [bh,
    n_qtiles], tile_cnt [bh, n_qtiles], is_col [bh, seq] int8, cols [bh, n_cols] int32, col_cnt [bh,
    n_qtiles]) with bh = batch * heads and n_qtiles = cdiv(seq, tile); tile_code holds ``d << 2 |
    upper << 1 | lower`` for the tile offsets d that meet a kept band, sorted (invalid entries last).
    """
    tile = block_size if tile is None else tile
    batch, heads = columns.shape[:2]
    dev = columns.device
    n_bands, n_qtiles = triton.cdiv(seq, block_size), triton.cdiv(seq, tile)
    # band_flag[o + 1] = band o kept; index 0 stands for band -1 (never kept)
    band_flag = torch.zeros(batch * heads, n_bands + 1, dtype=torch.int32, device=dev)
    band_flag.scatter_(1, bands.reshape(batch * heads, -1).long() + 1, 1)
    # offset d holds the diagonals (d*tile - tile, d*tile + tile): bands of its lowest and highest one
    d = torch.arange(n_qtiles, device=dev, dtype=torch.int64)
    lower = band_flag[:, torch.div(d * tile - tile + 1, block_size, rounding_mode="floor") + 1]
    upper = band_flag[:, torch.div(d * tile + tile - 1, block_size, rounding_mode="floor") + 1]
    code = (d << 2 | upper << 1 | lower).to(torch.int32)
    tile_code = torch.where((upper | lower) != 0, code, n_qtiles << 2).sort(dim=1).values.contiguous()
    # query tile m visits the offsets d <= m: codes up to m << 2 | 3
    qtiles = torch.arange(n_qtiles, device=dev, dtype=torch.int32).expand(batch * heads, n_qtiles).contiguous()
    tile_cnt = torch.searchsorted(tile_code, qtiles << 2 | 3, right=True).to(torch.int32)
    cols = columns.reshape(batch * heads, -1).to(torch.int32).contiguous()
    is_col = torch.zeros(batch * heads, seq, dtype=torch.int8, device=dev)
    is_col.scatter_(1, cols.long(), 1)
    ends = ((qtiles + 1) * tile).contiguous()
    col_cnt = torch.searchsorted(cols, ends, right=False).to(torch.int32)
    return tile_code, tile_cnt, is_col, cols, col_cnt


def default_tile(block_size: int) -> int:
    """Kernel tile (query rows and slash keys) for a selection block size: at most 64. An isolated
    band of ``block_size`` diagonals meets ``block_size / tile + 1`` key tiles of a query tile, so it
    fills half of the area that tiles of ``block_size`` visit and two thirds of that of tiles of half
    that size (H200, block 128: tile 64 with 4 warps ran faster than tile 128 with 8, docs/performance.md)."""
    return min(block_size, 64)


def vertical_slash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, columns: torch.Tensor,
                             bands: torch.Tensor, *, block_size: int = 64, scale: float | None = None,
                             softcap: float | None = None, sinks: torch.Tensor | None = None,
                             tile: int | None = None) -> torch.Tensor:
    """Vertical-slash sparse causal attention (prefill).

    q: [batch, heads, seq, head_dim]; k, v: [batch, kv_heads, seq, head_dim] (heads a multiple of
    kv_heads); columns: [batch, heads, n_cols] distinct key indices in [0, seq); bands: [batch, heads,
    n_bands] band indices in [0, cdiv(seq, block_size)) (both as from ``select_vertical_slash``). Row i
    keeps key j <= i iff j is a column or (i - j) // block_size is a band. A row that keeps nothing gets
    zeros. Returns out [batch, heads, seq, head_dim] in q's dtype. bf16/fp16, head_dim 64, 80, 96, 128,
    256, block_size 16, 32, 64, 128; CUDA, or CPU under TRITON_INTERPRET=1.

    ``softcap`` and ``sinks`` [heads]: honoured, as in :func:`trimix_probe.reference.masked_attention`
    (tanh cap on the scaled scores; a sink logit per q head in the denominator). ``tile``: the
    kernel's tile (query rows, slash keys), a power of two >= 16 dividing ``block_size``; None:
    :func:`default_tile`. The kept set does not depend on it.
    """
    q, k, v, out, scale, softcap_, sinks_, block_d = prepare("vertical_slash_attention", q, k, v, scale=scale,
                                                             softcap=softcap, sinks=sinks, block_size=block_size)
    # shape constraints
    batch, heads, seq, head_dim = q.shape
    kv_heads = k.shape[1]
    assert columns.dim() == 3 and columns.shape[:2] == (batch, heads), "columns: [batch, heads, n_cols]"
    assert bands.dim() == 3 and bands.shape[:2] == (batch, heads), "bands: [batch, heads, n_bands]"
    assert batch * kv_heads < 65536, "batch * kv_heads: at most 65535 (the grid's second axis)"
    tile = default_tile(block_size) if tile is None else tile
    if tile not in BLOCK_SIZES or block_size % tile:
        raise ValueError(f"vertical_slash_attention: tile {tile!r}; accepted: None or one of "
                         f"{', '.join(str(t) for t in BLOCK_SIZES if block_size % t == 0)} (divides block_size)")
    if seq == 0 or batch == 0:
        return out
    columns = columns.sort(dim=-1).values
    tile_code, tile_cnt, is_col, cols, col_cnt = vertical_slash_indices(columns, bands, seq, block_size, tile)
    n_qtiles = tile_cnt.shape[1]
    block_c = 16 if _INTERPRET else 64
    grid = (n_qtiles * (heads // kv_heads), batch * kv_heads)
    with on_device(q):
        _vertical_slash_kernel[grid](
            q, k, v, out, out if sinks_ is None else sinks_,  # Sinks not read without sinks (HAS_SINKS=False)
            tile_code, tile_cnt, is_col, cols, col_cnt,
            scale, softcap_, seq, seq_bucket(seq), n_qtiles, tile_code.shape[1], cols.shape[1],
            heads, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            GROUP=heads // kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK=block_size, TILE=tile,
            BLOCK_C=block_c, HAS_SOFTCAP=softcap is not None, HAS_SINKS=sinks is not None)
    return out
