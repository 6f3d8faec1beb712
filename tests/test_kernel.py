"""Triangle-attention kernel vs the torch reference.

Without CUDA the real Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py) at tiny
shapes; there the blocks are 16 x 16 and the last rows are split into 32-key chunks, so seq <= 80
already crosses every branch (sink loop, masked / unmasked window blocks, several split-K chunks,
several merge blocks). Full-size checks run on a GPU (marker ``gpu``).

Error bound: the kernel's max error against an fp64 reference is at most twice that of plain torch
in the same dtype (``compute_dtype=None``), plus a tiny absolute floor.
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
