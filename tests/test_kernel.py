"""Triangle-attention kernel vs the torch reference.

Without CUDA the real Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py) at tiny
shapes; there the blocks are 16 x 16 and the last rows are split into 32-key chunks, so seq <= 80
already crosses every branch (sink loop, masked / unmasked window blocks, several split-K chunks,
several merge blocks). Full-size checks run on a GPU (marker ``gpu``).

Error bound: the kernel's max error against an fp64 reference is at most twice that of plain torch
in the same dtype (``compute_dtype=None``), plus a tiny absolute floor.

Softcap (Gemma-2) and sinks (gpt-oss) are checked against ``explicit_attention``, the formula written
out here in float64 (independent of the package's reference, which it checks too); the yardstick is
the same formula in the inputs' dtype. GPU: ``python -m pytest -q -m gpu tests/test_kernel.py``.
"""

from __future__ import annotations

import pytest
import torch

from trimix_probe.reference import triangle_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = 1e-5


def _triangle(*args, **kwargs):
    from trimix_probe.kernels.triangle import triangle_attention

    return triangle_attention(*args, **kwargs)


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the launcher allocates starts as NaN, so an element it never writes shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: nan(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: nan(empty_like(*a, **kw)))


def _inputs(batch, heads, kv_heads, seq, head_dim, dtype, device=DEVICE, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    shape_q, shape_k = (batch, heads, seq, head_dim), (batch, kv_heads, seq, head_dim)
    return tuple(torch.randn(s, generator=g, device=device, dtype=torch.float32).to(dtype)
                 for s in (shape_q, shape_k, shape_k))


def _check(q, k, v, *, n_init, n_local, last_n, scale=None):
    """Run the kernel (poisoned outputs) and compare with fp64 and plain-torch references."""
    out, lse = _triangle(q, k, v, n_init=n_init, n_local=n_local, last_n=last_n, scale=scale, return_lse=True)
    kw = dict(n_init=n_init, n_local=n_local, last_n=last_n, scale=scale, return_lse=True)
    ref, ref_lse = triangle_attention_ref(q.double(), k.double(), v.double(), compute_dtype=torch.float64, **kw)
    pt, pt_lse = triangle_attention_ref(q, k, v, compute_dtype=None, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lse).all(), "unwritten (NaN) or non-finite output"
    err, err_pt = (out.double() - ref).abs().max().item(), (pt.double() - ref).abs().max().item()
    assert err <= 2 * err_pt + FLOOR, f"out error {err:.3e} > 2 x torch {q.dtype} error {err_pt:.3e}"
    lerr, lerr_pt = (lse.double() - ref_lse).abs().max().item(), (pt_lse.double() - ref_lse).abs().max().item()
    assert lerr <= 2 * lerr_pt + 1e-4, f"lse error {lerr:.3e} > 2 x torch {q.dtype} error {lerr_pt:.3e}"
    return out


F16, BF16 = torch.float16, torch.bfloat16
# (batch, heads, kv_heads, seq, head_dim, n_init, n_local, last_n, dtype)
CASES = {
    "seq<n_local": (1, 2, 2, 40, 64, 4, 64, 8, F16),  # window covers everything: dense causal, GQA ratio 1
    "seq<=last_n": (1, 2, 1, 24, 64, 4, 8, 32, BF16),  # every row is a last row: band kernel skipped
    "seq==last_n": (1, 2, 1, 32, 64, 4, 8, 32, F16),  # boundary of the above, one full split-K chunk
    "n_init=0": (1, 2, 1, 70, 64, 0, 16, 8, F16),  # no sink: sink loop empty
    "last_n=0": (1, 2, 1, 70, 64, 4, 16, 0, BF16),  # no split-K / merge launch at all
    "seq%block!=0": (1, 2, 1, 77, 64, 8, 24, 12, F16),  # ragged last query and key blocks
    "seq=1": (1, 2, 1, 1, 64, 8, 512, 128, F16),  # a single row, which is also the last row
    "seq=1,last_n=0": (1, 2, 1, 1, 64, 8, 512, 0, BF16),  # a single row through the band kernel
    "gqa4": (1, 4, 1, 50, 64, 3, 16, 8, BF16),  # GQA ratio 4, window not a multiple of the block
    "gqa7": (1, 7, 1, 45, 64, 2, 16, 5, F16),  # GQA ratio 7 (odd group)
    "batch2": (2, 4, 2, 48, 64, 4, 16, 8, BF16),  # batch 2 with GQA 2: batch strides
    "n_init>sink_block": (1, 1, 1, 64, 64, 20, 8, 4, F16),  # sink spans two 16-key sink blocks
    "n_local=1": (1, 1, 1, 40, 64, 2, 1, 4, BF16),  # window of the diagonal only
    "many_chunks": (1, 2, 1, 80, 64, 4, 16, 50, F16),  # last rows: 3 chunks, 4 row blocks, 4 merge blocks
    "d80": (1, 2, 1, 40, 80, 4, 16, 8, BF16),  # head_dim padded 80 -> 128 with masked loads
    "d96": (1, 1, 1, 33, 96, 4, 16, 8, F16),  # head_dim padded 96 -> 128
    "d128": (1, 2, 2, 40, 128, 4, 16, 8, F16),  # head_dim 128
    "d128_bf16": (1, 2, 1, 37, 128, 4, 16, 8, BF16),  # head_dim 128, bf16, ragged
    "d256": (1, 1, 1, 24, 256, 2, 8, 4, BF16),  # head_dim 256
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference(case, poison):
    batch, heads, kv_heads, seq, head_dim, n_init, n_local, last_n, dtype = case
    q, k, v = _inputs(batch, heads, kv_heads, seq, head_dim, dtype, seed=seq * 31 + heads)
    _check(q, k, v, n_init=n_init, n_local=n_local, last_n=last_n)


def test_custom_scale(poison):
    q, k, v = _inputs(1, 2, 1, 40, 64, F16, seed=7)
    _check(q, k, v, n_init=4, n_local=16, last_n=8, scale=0.3)


def test_non_contiguous(poison):
    # transformers hands attention q as a [batch, seq, heads, d] buffer transposed to [batch, heads, seq, d];
    # k, v here are every other kv head of a larger buffer; v also has a non-unit head_dim stride
    batch, heads, kv_heads, seq, d = 2, 4, 2, 45, 64
    g = torch.Generator(device=DEVICE).manual_seed(11)
    q = torch.randn(batch, seq, heads, d, generator=g, device=DEVICE).to(BF16).transpose(1, 2)
    k = torch.randn(batch, 2 * kv_heads, seq, d, generator=g, device=DEVICE).to(BF16)[:, ::2]
    v = torch.randn(batch, kv_heads, d, seq, generator=g, device=DEVICE).to(BF16).transpose(2, 3)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check(q, k, v, n_init=4, n_local=16, last_n=8)


def test_public_api_and_no_lse():
    import trimix_probe

    q, k, v = _inputs(1, 4, 2, 40, 64, F16, seed=3)
    out = trimix_probe.triangle_attention(q, k, v, n_init=4, n_local=16, last_n=8)
    assert isinstance(out, torch.Tensor)
    ref = _triangle(q, k, v, n_init=4, n_local=16, last_n=8)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_dropped_keys_do_not_leak():
    # change only keys the triangle drops (middle section) for the rows before the last ones: their output must not move
    seq, n_init, n_local, last_n = 64, 4, 16, 8
    q, k, v = _inputs(1, 2, 1, seq, 64, F16, seed=5)
    out = _triangle(q, k, v, n_init=n_init, n_local=n_local, last_n=last_n)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, n_init:20] = torch.randn_like(k2[:, :, n_init:20])
    v2[:, :, n_init:20] = torch.randn_like(v2[:, :, n_init:20])
    out2 = _triangle(q, k2, v2, n_init=n_init, n_local=n_local, last_n=last_n)
    # rows < n_init see only sink keys; rows >= 20 + n_local - 1 have their window past key 20
    for rows in (slice(0, n_init), slice(20 + n_local - 1, seq - last_n)):
        torch.testing.assert_close(out[:, :, rows], out2[:, :, rows], rtol=0, atol=0)
    assert not torch.equal(out[:, :, n_init:20], out2[:, :, n_init:20]), "rows inside the changed window must move"
    assert not torch.equal(out[:, :, seq - last_n:], out2[:, :, seq - last_n:]), "last rows must see the middle keys"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v: (q.float(), k.float(), v.float()), "dtype torch.float32; accepted: torch.float16, torch.bfloat16"),
        (lambda q, k, v: (q[..., :72], k[..., :72], v[..., :72]), "head_dim 72; accepted: 64, 80, 96, 128, 256"),
        (lambda q, k, v: (q, k[:, :3], v[:, :3]), "4 heads, k/v have 3 kv heads"),
        (lambda q, k, v: (q, k[:, :, :-1], v[:, :, :-1]), "do not fit q"),
        (lambda q, k, v: (q, k.to(BF16), v), "has dtype torch.bfloat16 but q has torch.float16"),
        (lambda q, k, v: (q, k.to("meta"), v), "is on meta but q is on"),
        (lambda q, k, v: (q[0], k, v), "must be a 4-d tensor"),
    ],
    ids=["float32", "head_dim72", "kv_heads", "seq_mismatch", "mixed_dtype", "mixed_device", "3d"],
)
def test_bad_inputs(change, message):
    q, k, v = _inputs(1, 4, 4, 16, 128, F16, seed=1)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        _triangle(*change(q, k, v))


# -- softcap (Gemma-2) and sinks (gpt-oss) -------------------------------------------------------
def explicit_attention(q, k, v, keep, *, scale=None, softcap=None, sinks=None, dtype=torch.float64):
    """The formula spelled out, independent of the package: scores -> tanh cap -> mask -> softmax over
    the keys plus one sink column (no value) -> drop the column. keep: bool, broadcast to [batch, heads,
    seq, seq]. dtype float64 is the truth; q's dtype is plain torch at that precision (the yardstick).
    Returns out [batch, heads, seq, head_dim] in ``dtype`` and lse [batch, heads, seq] (including the sink)."""
    batch, heads, seq, d = q.shape
    group = heads // k.shape[1]
    q, k, v = q.to(dtype), k.repeat_interleave(group, 1).to(dtype), v.repeat_interleave(group, 1).to(dtype)
    scores = q @ k.transpose(-1, -2) * (d ** -0.5 if scale is None else scale)  # [batch, head, q_pos, k_pos]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~keep, float("-inf"))
    sink = torch.full((heads,), float("-inf"), device=q.device) if sinks is None else sinks
    full = torch.cat([scores, sink.to(dtype).view(1, heads, 1, 1).expand(batch, heads, seq, 1)], dim=-1)
    lse = torch.logsumexp(full.double() if dtype == torch.float64 else full.float(), dim=-1)
    p = torch.softmax(full, dim=-1).nan_to_num(0.0)[..., :-1]
    return p @ v, lse


def triangle_keep(seq, n_init, n_local, last_n, device=DEVICE):
    i, j = torch.arange(seq, device=device)[:, None], torch.arange(seq, device=device)[None, :]
    return (j <= i) & ((j < n_init) | (i - j < n_local) | (i >= seq - last_n))


def _features(heads, which, device=DEVICE, seed=0):
    """(softcap, sinks) for a case: a cap of 1.5 bends scores of std ~1 well into tanh's curve; sink
    logits around the scores' own log-sum-exp so they take a visible share of each row."""
    g = torch.Generator(device=device).manual_seed(seed + 1000)
    softcap = 1.5 if which in ("softcap", "both") else None
    sinks = torch.randn(heads, generator=g, device=device) + 2.0 if which in ("sinks", "both") else None
    return softcap, sinks


def _check_explicit(got, got_lse, q, k, v, keep, *, softcap, sinks, scale=None):
    """got (and got_lse if not None) against the float64 formula; bound: twice plain torch in q's dtype."""
    ref, ref_lse = explicit_attention(q, k, v, keep, scale=scale, softcap=softcap, sinks=sinks)
    pt, pt_lse = explicit_attention(q, k, v, keep, scale=scale, softcap=softcap, sinks=sinks, dtype=q.dtype)
    assert got.shape == q.shape and got.dtype == q.dtype and torch.isfinite(got).all()
    err, err_pt = (got.double() - ref).abs().max().item(), (pt.double() - ref).abs().max().item()
    assert err <= 2 * err_pt + FLOOR, f"out error {err:.3e} > 2 x torch {q.dtype} error {err_pt:.3e}"
    if got_lse is not None:
        assert torch.isfinite(got_lse).all()
        lerr = (got_lse.double() - ref_lse).abs().max().item()
        lerr_pt = (pt_lse.double() - ref_lse).abs().max().item()
        assert lerr <= 2 * lerr_pt + 1e-4, f"lse error {lerr:.3e} > 2 x torch {q.dtype} error {lerr_pt:.3e}"


# (batch, heads, kv_heads, seq, head_dim, n_init, n_local, last_n, dtype, features)
FEATURE_CASES = {
    "softcap,odd": (1, 4, 2, 77, 64, 4, 24, 12, BF16, "softcap"),  # ragged blocks, GQA 2, band + split-K + merge
    "sinks,odd": (1, 4, 2, 77, 64, 4, 24, 12, F16, "sinks"),
    "both,gqa7": (1, 7, 1, 45, 64, 2, 16, 5, BF16, "both"),  # GQA 7: sinks indexed by q head, not kv head
    "both,batch2": (2, 4, 2, 48, 64, 4, 16, 8, F16, "both"),  # batch strides; lse layout of the sinks
    "both,seq<n_local": (1, 2, 2, 40, 64, 4, 64, 8, BF16, "both"),  # window covers everything
    "both,seq<=last_n": (1, 2, 1, 24, 64, 4, 8, 32, F16, "both"),  # merge only: sinks only in the merge
    "both,last_n=0": (1, 2, 1, 70, 64, 4, 16, 0, BF16, "both"),  # band only: sinks only in the epilogue
    "both,d80": (1, 2, 1, 40, 80, 4, 16, 8, BF16, "both"),  # padded head_dim
}


@pytest.mark.parametrize("case", FEATURE_CASES.values(), ids=FEATURE_CASES.keys())
def test_softcap_and_sinks_match_the_formula(case, poison):
    batch, heads, kv_heads, seq, head_dim, n_init, n_local, last_n, dtype, which = case
    q, k, v = _inputs(batch, heads, kv_heads, seq, head_dim, dtype, seed=seq * 17 + heads)
    softcap, sinks = _features(heads, which, seed=seq)
    out, lse = _triangle(q, k, v, n_init=n_init, n_local=n_local, last_n=last_n, return_lse=True,
                         softcap=softcap, sinks=sinks)
    _check_explicit(out, lse, q, k, v, triangle_keep(seq, n_init, n_local, last_n), softcap=softcap, sinks=sinks)


def test_softcap_with_custom_scale_and_bf16_sinks(poison):
    # a large scale saturates the cap (|tanh| -> 1); gpt-oss keeps its sinks as a bf16 parameter
    q, k, v = _inputs(1, 4, 1, 50, 64, BF16, seed=23)
    softcap, sinks = 3.0, (torch.randn(4, device=DEVICE) * 2).to(BF16).requires_grad_()
    out, lse = _triangle(q, k, v, n_init=3, n_local=16, last_n=8, scale=0.6, return_lse=True, softcap=softcap,
                         sinks=sinks)
    _check_explicit(out, lse, q, k, v, triangle_keep(50, 3, 16, 8), softcap=softcap, sinks=sinks.detach().float(),
                    scale=0.6)


@pytest.mark.parametrize("which", ["softcap", "sinks", "both"])
def test_reference_matches_the_formula(which):
    # the package's torch reference (used by the CPU fallback and the probe) against the same formula, in
    # float64; the mask leaves rows 0..2 without any key: out 0, lse = the sink (or -inf without sinks)
    from trimix_probe.reference import masked_attention

    batch, heads, kv_heads, seq, d = 2, 6, 2, 33, 16
    q, k, v = _inputs(batch, heads, kv_heads, seq, d, torch.float64, seed=41)
    softcap, sinks = _features(heads, which, seed=41)
    sinks = None if sinks is None else sinks.double()

    def mask_fn(q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx >= 3) & ((q_idx - kv_idx) % 3 != 1)

    i, j = torch.arange(seq, device=DEVICE)[:, None], torch.arange(seq, device=DEVICE)[None, :]
    ref, ref_lse = explicit_attention(q, k, v, mask_fn(i, j), softcap=softcap, sinks=sinks)
    out, lse = masked_attention(q, k, v, mask_fn, softcap=softcap, sinks=sinks, block_q=8,
                                compute_dtype=torch.float64)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-5)
    assert (out[:, :, :3] == 0).all()
    # triangle_attention_ref passes both on
    tri = triangle_attention_ref(q, k, v, n_init=2, n_local=5, last_n=4, softcap=softcap, sinks=sinks,
                                 compute_dtype=torch.float64)
    ref_tri, _ = explicit_attention(q, k, v, triangle_keep(seq, 2, 5, 4), softcap=softcap, sinks=sinks)
    torch.testing.assert_close(tri, ref_tri, rtol=0, atol=1e-6)


def _dynamic_case(batch, heads, kv_heads, seq, block, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    n_blocks = -(-seq // block)
    columns = torch.stack([torch.stack([torch.randperm(seq, generator=g, device=DEVICE)[:5] for _ in range(heads)])
                           for _ in range(batch)])  # [batch, heads, 5]
    bands = torch.stack([torch.stack([torch.randperm(n_blocks, generator=g, device=DEVICE)[:2].sort().values
                                      for _ in range(heads)]) for _ in range(batch)])  # [batch, heads, 2]
    keep_blocks = torch.rand(batch, heads, n_blocks, n_blocks, generator=g, device=DEVICE) < 0.5
    return columns, bands, keep_blocks


@pytest.mark.parametrize("which", ["softcap", "sinks", "both"])
@pytest.mark.parametrize("kernel", ["vertical_slash", "blockwise"])
def test_dynamic_kernels_honour_softcap_and_sinks(kernel, which, poison):
    from trimix_probe.kernels.blockwise import blockwise_attention
    from trimix_probe.kernels.vertical_slash import vertical_slash_attention

    batch, heads, kv_heads, seq, block = 2, 4, 2, 53, 16  # ragged last block, GQA 2, batch 2
    q, k, v = _inputs(batch, heads, kv_heads, seq, 64, BF16, seed=61)
    softcap, sinks = _features(heads, which, seed=61)
    columns, bands, keep_blocks = _dynamic_case(batch, heads, kv_heads, seq, block, seed=62)
    i, j = torch.arange(seq, device=DEVICE)[:, None], torch.arange(seq, device=DEVICE)[None, :]
    if kernel == "vertical_slash":
        out = vertical_slash_attention(q, k, v, columns, bands, block_size=block, softcap=softcap, sinks=sinks)
        is_col = torch.zeros(batch, heads, 1, seq, dtype=torch.bool, device=DEVICE)
        is_col.scatter_(3, columns[:, :, None, :], True)
        in_band = (bands[:, :, :, None, None] == ((i - j) // block)).any(2)  # [batch, heads, seq, seq]
        keep = (j <= i) & (is_col | in_band)
    else:
        out = blockwise_attention(q, k, v, keep_blocks, block_size=block, softcap=softcap, sinks=sinks)
        keep = (j <= i) & keep_blocks[:, :, i // block, j // block]
    _check_explicit(out, None, q, k, v, keep, softcap=softcap, sinks=sinks)


@pytest.mark.parametrize("pack", [1, 2, 4])
def test_gqa_packing(pack, poison):
    # the band kernel packs the q heads of one kv head into its rows (default: all 4 here); every packing
    # must give the formula's rows, sinks indexed per packed row
    q, k, v = _inputs(1, 8, 2, 61, 64, BF16, seed=71)  # GQA 4, ragged last block
    softcap, sinks = _features(8, "both", seed=71)
    out, lse = _triangle(q, k, v, n_init=3, n_local=16, last_n=6, return_lse=True, softcap=softcap, sinks=sinks,
                         pack=pack)
    _check_explicit(out, lse, q, k, v, triangle_keep(61, 3, 16, 6), softcap=softcap, sinks=sinks)


def _gpu_tiles():
    from trimix_probe.kernels import triangle

    band = [("band", shape, pack) for shape in triangle.BAND_SHAPES for pack in (None, 1)]
    wide = [(kernel, shape, None) for shape in triangle.WIDE_HEAD_SHAPES for kernel in ("band", "last")]
    return band + [("last", shape, None) for shape in triangle.LAST_SHAPES] + wide


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's check of each config; a GPU autotunes them")
@pytest.mark.parametrize("kernel,shape,pack", _gpu_tiles(),
                         ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_every_gpu_tile_config(kernel, shape, pack, monkeypatch, poison):
    # the interpreter runs one 16 x 16 config; a GPU autotunes over BAND_SHAPES / LAST_SHAPES (both
    # kernels over WIDE_HEAD_SHAPES for head_dim > 128, here 256). Each config alone, under the interpreter, must give the
    # formula's rows: packed (GQA 4: 4 heads a tile) and unpacked, window blocks both masked and whole
    # (n_local > BLOCK_N), softcap and sinks, a ragged last tile; the split-K last rows over several chunks
    from trimix_probe.kernels import triangle

    monkeypatch.setattr(getattr(triangle, f"_{kernel}_kernel"), "configs", [triangle._config(shape)])
    # split-K chunks are a multiple of every BLOCK_N on a GPU (>= 512 keys); the interpreter's 32 is
    # made for its 16 x 16 config, so take 128 here (three chunks of the 300 keys)
    monkeypatch.setattr(triangle, "_chunk", lambda seq: 128)
    seq, n_init, n_local, last_n = (333, 4, 160, 9) if kernel == "band" else (300, 4, 24, 70)
    head_dim = 256 if shape in triangle.WIDE_HEAD_SHAPES else 64  # the wide configs serve head_dim > 128
    q, k, v = _inputs(1, 8, 2, seq, head_dim, BF16, seed=sum(shape))
    softcap, sinks = _features(8, "both", seed=sum(shape))
    out, lse = _triangle(q, k, v, n_init=n_init, n_local=n_local, last_n=last_n, return_lse=True, softcap=softcap,
                         sinks=sinks, pack=pack)
    _check_explicit(out, lse, q, k, v, triangle_keep(seq, n_init, n_local, last_n), softcap=softcap, sinks=sinks)


# vertical-slash tiles smaller than the selection block (the default at block 128 is a tile of 64):
# (batch, heads, kv_heads, seq, block, tile, features)
VS_TILE_CASES = {
    "tile16,block32,odd": (1, 4, 2, 77, 32, 16, None),  # two tiles a band block, ragged last tile
    "tile16,block64,gqa4": (1, 4, 1, 150, 64, 16, None),  # four tiles a band block, GQA 4
    "tile32,block64,batch2,both": (2, 2, 2, 100, 64, 32, "both"),  # batch strides, softcap and sinks
}


@pytest.mark.parametrize("case", VS_TILE_CASES.values(), ids=VS_TILE_CASES.keys())
def test_vertical_slash_tile_below_block(case, poison):
    from trimix_probe.kernels.vertical_slash import vertical_slash_attention

    batch, heads, kv_heads, seq, block, tile, which = case
    q, k, v = _inputs(batch, heads, kv_heads, seq, 64, BF16, seed=seq + block)
    softcap, sinks = _features(heads, which, seed=seq) if which else (None, None)
    columns, bands, _ = _dynamic_case(batch, heads, kv_heads, seq, block, seed=seq)
    out = vertical_slash_attention(q, k, v, columns, bands, block_size=block, tile=tile, softcap=softcap, sinks=sinks)
    i, j = torch.arange(seq, device=DEVICE)[:, None], torch.arange(seq, device=DEVICE)[None, :]
    is_col = torch.zeros(batch, heads, 1, seq, dtype=torch.bool, device=DEVICE)
    is_col.scatter_(3, columns[:, :, None, :], True)
    in_band = (bands[:, :, :, None, None] == ((i - j) // block)).any(2)
    _check_explicit(out, None, q, k, v, (j <= i) & (is_col | in_band), softcap=softcap, sinks=sinks)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(softcap=0.0), "softcap 0.0; accepted: None or a positive finite number"),
        (dict(softcap=float("nan")), "softcap nan; accepted"),
        (dict(softcap="50"), "softcap '50'; accepted"),
        (dict(sinks=torch.zeros(2)), r"sinks \(2,\); accepted: None or one logit per q head, a tensor \[4\]"),
    ],
    ids=["softcap0", "softcap_nan", "softcap_str", "sinks_shape"],
)
def test_bad_softcap_and_sinks(kwargs, message):
    q, k, v = _inputs(1, 4, 2, 16, 64, F16, seed=1)
    with pytest.raises(ValueError, match=message):
        _triangle(q, k, v, **kwargs)


def test_public_api_passes_softcap_and_sinks():
    import trimix_probe

    q, k, v = _inputs(1, 4, 2, 40, 64, BF16, seed=3)
    kw = dict(n_init=4, n_local=16, last_n=8, softcap=2.0, sinks=torch.randn(4, device=DEVICE))
    torch.testing.assert_close(trimix_probe.triangle_attention(q, k, v, **kw), _triangle(q, k, v, **kw),
                               rtol=0, atol=0)


# -- full size, on a GPU --------------------------------------------------------------------------
LLAMA_8B = dict(heads=32, kv_heads=8, head_dim=128)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "seq, dtype, layout",
    [
        (4096, BF16, "contiguous"),  # Llama-3.1-8B heads at 4K
        (4096, F16, "contiguous"),  # fp16
        (5000, BF16, "transposed"),  # ragged length, q/k/v as transformers lays them out
        (16384, BF16, "contiguous"),
        (32768, BF16, "transposed"),  # 32K: band + 32 split-K chunks of 1024 keys
    ],
)
def test_gpu_llama8b(seq, dtype, layout, poison):
    h, hk, d = LLAMA_8B["heads"], LLAMA_8B["kv_heads"], LLAMA_8B["head_dim"]
    if layout == "transposed":
        g = torch.Generator(device="cuda").manual_seed(seq)
        q = torch.randn(1, seq, h, d, generator=g, device="cuda").to(dtype).transpose(1, 2)
        k, v = (torch.randn(1, seq, hk, d, generator=g, device="cuda").to(dtype).transpose(1, 2) for _ in range(2))
    else:
        q, k, v = _inputs(1, h, hk, seq, d, dtype, device="cuda", seed=seq)
    _check(q, k, v, n_init=8, n_local=512, last_n=128)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 80, 96, 256])
def test_gpu_head_dims(head_dim, poison):
    q, k, v = _inputs(2, 8, 2, 3000, head_dim, BF16, device="cuda", seed=head_dim)
    _check(q, k, v, n_init=8, n_local=512, last_n=128)


@pytest.mark.gpu
def test_gpu_seq_lengths_share_tuning():
    # lengths in one power-of-two bucket reuse the tuned config: no new autotune entry
    from trimix_probe.kernels.triangle import _band_kernel, _last_kernel

    for seq in (4100, 4500, 6000, 8192):
        _triangle(*_inputs(1, 8, 2, seq, 128, BF16, device="cuda", seed=seq))
        if seq == 4100:
            before = (len(_band_kernel.cache), len(_last_kernel.cache))
    assert (len(_band_kernel.cache), len(_last_kernel.cache)) == before


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["softcap", "sinks", "both"])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_gpu_softcap_and_sinks(head_dim, which, poison):
    # the model families' head sizes (Llama 128, Gemma-2 256, gpt-oss 64, Phi-3 96, ...) at 3K tokens
    seq, n_init, n_local, last_n = 3000, 8, 512, 128
    q, k, v = _inputs(2, 8, 2, seq, head_dim, BF16, device="cuda", seed=head_dim)
    softcap, sinks = _features(8, which, device="cuda", seed=head_dim)
    softcap = None if softcap is None else 20.0  # scores of std ~1 at a realistic cap (Gemma-2: 50)
    out, lse = _triangle(q, k, v, n_init=n_init, n_local=n_local, last_n=last_n, return_lse=True,
                         softcap=softcap, sinks=sinks)
    keep = triangle_keep(seq, n_init, n_local, last_n, device="cuda")
    _check_explicit(out, lse, q, k, v, keep, softcap=softcap, sinks=sinks)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["vertical_slash", "blockwise"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gpu_dynamic_softcap_and_sinks(kernel, head_dim, poison):
    from trimix_probe.kernels.blockwise import blockwise_attention
    from trimix_probe.kernels.vertical_slash import vertical_slash_attention

    batch, heads, seq, block = 1, 8, 2048, 64
    q, k, v = _inputs(batch, heads, 2, seq, head_dim, BF16, device="cuda", seed=head_dim)
    softcap, sinks = 20.0, torch.randn(heads, device="cuda") + 2.0
    g = torch.Generator(device="cuda").manual_seed(head_dim)
    i, j = torch.arange(seq, device="cuda")[:, None], torch.arange(seq, device="cuda")[None, :]
    n_blocks = seq // block
    if kernel == "vertical_slash":
        columns = torch.stack([torch.randperm(seq, generator=g, device="cuda")[:64] for _ in range(heads)])[None]
        bands = torch.stack([torch.randperm(n_blocks, generator=g, device="cuda")[:4].sort().values
                             for _ in range(heads)])[None]
        out = vertical_slash_attention(q, k, v, columns, bands, block_size=block, softcap=softcap, sinks=sinks)
        is_col = torch.zeros(batch, heads, 1, seq, dtype=torch.bool, device="cuda")
        is_col.scatter_(3, columns[:, :, None, :], True)
        keep = (j <= i) & (is_col | (bands[:, :, :, None, None] == ((i - j) // block)).any(2))
    else:
        keep_blocks = torch.rand(batch, heads, n_blocks, n_blocks, generator=g, device="cuda") < 0.3
        out = blockwise_attention(q, k, v, keep_blocks, block_size=block, softcap=softcap, sinks=sinks)
        keep = (j <= i) & keep_blocks[:, :, i // block, j // block]
    _check_explicit(out, None, q, k, v, keep, softcap=softcap, sinks=sinks)


def test_kernels_read_only_constexpr_globals():
    """A plain int or float global read inside a @triton.jit function compiles under the interpreter
    but not on a GPU ("Cannot access global variable ... from within @jit'ed function"); the fused
    estimate first shipped with such a ROWS = 64. Every number a kernel reads from its module must be
    a tl.constexpr."""
    import importlib
    import pkgutil

    import triton
    import trimix_probe.kernels as kernels_pkg

    bad = []
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        mod = importlib.import_module(f"trimix_probe.kernels.{info.name}")
        for name, obj in vars(mod).items():
            fn = obj
            while hasattr(fn, "fn"):  # Autotuner -> JITFunction -> python function
                fn = fn.fn
            if not isinstance(obj, (triton.runtime.JITFunction, triton.runtime.Autotuner)):
                continue
            for used in fn.__code__.co_names:
                value = vars(mod).get(used)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    bad.append(f"{info.name}.{name} reads {used} = {value!r}")
    assert not bad, bad
