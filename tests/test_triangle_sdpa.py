"""The SDPA-block triangle attention (the path off Triton) vs the torch reference.

Error bound as for the kernel: the max error against an fp64 reference is at most twice that of
plain torch in the same dtype (``compute_dtype=None``), plus a small absolute floor. Fresh random
inputs per case; a small ``block`` so that short sequences cross several band blocks.
"""

from __future__ import annotations

import pytest
import torch

from trimix_probe.reference import masked_attention, triangle_attention_ref, triangle_mask_fn
from trimix_probe.triangle_sdpa import triangle_attention_sdpa

F32, BF16 = torch.float32, torch.bfloat16
FLOOR = {F32: 1e-6, BF16: 1e-3}
# (batch, heads, kv_heads, seq, head_dim, n_init, n_local, last_n, block, dtype)
CASES = {
    "odd,ragged": (1, 2, 1, 77, 32, 4, 24, 12, 16, F32),  # odd length, band not a multiple of the block
    "seq<n_local": (1, 2, 2, 40, 32, 4, 64, 8, 16, BF16),  # window covers everything: causal, GQA 1
    "seq<=last_n": (1, 2, 1, 24, 32, 4, 8, 32, 16, F32),  # every row is a last row: no band call
    "last_n=0": (1, 3, 1, 70, 32, 4, 16, 0, 16, BF16),  # band only, GQA 3
    "n_init=0": (1, 2, 1, 70, 32, 0, 16, 8, 16, F32),  # no sink columns
    "gqa7,odd": (1, 7, 1, 45, 32, 2, 16, 5, 8, F32),  # GQA 7 folded into the rows
    "batch2": (2, 4, 2, 65, 32, 4, 16, 8, 16, BF16),  # batch 2 with GQA 2
    "n_init>n_local": (1, 1, 1, 64, 32, 20, 8, 4, 16, F32),  # sinks overlap many windows
    "n_local=1": (1, 2, 1, 40, 32, 2, 1, 4, 16, BF16),  # diagonal-only window
    "block>seq": (1, 2, 1, 50, 32, 3, 10, 6, 128, F32),  # one block, padded rows and keys
    "default-ish": (1, 9, 3, 801, 64, 8, 256, 64, 128, F32),  # SmolLM2 heads, real block size
    "seq=1": (1, 2, 1, 1, 32, 8, 512, 0, 16, F32),  # a single row through the band call
}


def _inputs(batch, heads, kv_heads, seq, head_dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g).to(dtype) for shape in
                 ((batch, heads, seq, head_dim), (batch, kv_heads, seq, head_dim), (batch, kv_heads, seq, head_dim)))


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case):
    batch, heads, kv_heads, seq, d, n_init, n_local, last_n, block, dtype = CASES[case]
    q, k, v = _inputs(batch, heads, kv_heads, seq, d, dtype, seed=list(CASES).index(case))
    kw = dict(n_init=n_init, n_local=n_local, last_n=last_n, scale=0.7 / d ** 0.5)
    out = triangle_attention_sdpa(q, k, v, block=block, **kw)
    ref = triangle_attention_ref(q.double(), k.double(), v.double(), compute_dtype=torch.float64, **kw)
    pt = triangle_attention_ref(q, k, v, compute_dtype=None, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    err, err_pt = (out.double() - ref).abs().max().item(), (pt.double() - ref).abs().max().item()
    assert err <= 2 * err_pt + FLOOR[dtype], f"error {err:.3e} > 2 x torch {dtype} error {err_pt:.3e}"


def test_differs_from_dense_causal():
    """The check above can fail: the triangle output is not the causal one on these inputs (so a
    version that ignored the pattern would not pass), and a mask off by one key is caught."""
    q, k, v = _inputs(1, 2, 1, 90, 32, F32, seed=5)
    out = triangle_attention_sdpa(q, k, v, n_init=4, n_local=16, last_n=8, block=16)
    causal = masked_attention(q, k, v, lambda i, j: j <= i)[0]
    assert (out - causal).abs().max() > 1e-2
    wider, _ = masked_attention(q, k, v, triangle_mask_fn(90, 4, 17, 8))  # window one key wider
    assert (out - wider).abs().max() > 1e-2


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_local=0), "n_local must be an integer >= 1, got 0"),
    (dict(n_init=-1), "n_init must be an integer >= 0, got -1"),
    (dict(last_n=2.0), "last_n must be an integer >= 0, got 2.0"),
    (dict(block=0), "block must be an int >= 1"),
    (dict(softcap=30.0), "softcap and learned sinks are not supported"),
])
def test_bad_arguments_one_line(kwargs, match):
    q, k, v = _inputs(1, 2, 1, 20, 16, F32, seed=1)
    with pytest.raises(ValueError, match=match):
        triangle_attention_sdpa(q, k, v, **kwargs)


def test_rejects_non_tensor():
    q, k, v = _inputs(1, 2, 1, 20, 16, F32, seed=2)
    with pytest.raises(ValueError, match="q must be a 4-d torch.Tensor"):
        triangle_attention_sdpa(q.numpy(), k, v)


def test_fallback_paths_named_off_triton(monkeypatch):
    """Off Triton (CPU without the interpreter) `run` names the path of each non-dense kind."""
    from trimix_probe.ops import fallback_paths

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    paths = fallback_paths({"dense", "triangle"}, torch.device("cpu"), torch.float32, 64)
    assert paths == {"triangle": "torch SDPA blocks (no Triton on cpu)"}
    assert set(fallback_paths({"dynamic"}, torch.device("cpu"), torch.bfloat16, 64)) == {"dynamic"}
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs the kernel for bf16, head_dim 64
    assert fallback_paths({"triangle"}, torch.device("cpu"), torch.bfloat16, 64) == {}
    assert "float32" in fallback_paths({"triangle"}, torch.device("cpu"), torch.float32, 64)["triangle"]
    # softcap or sinks: the SDPA path refuses them, so the triangle layers take the reference
    assert fallback_paths({"triangle"}, torch.device("cpu"), torch.float32, 64, features=True)["triangle"] \
        .startswith("torch reference")
