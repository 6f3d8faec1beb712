"""Dynamic sparse attention: selection on crafted inputs, Triton kernels vs the torch references
(under TRITON_INTERPRET=1 on CPU), and a tiny Llama with a dynamic plan through patch_model.

Kernel error is judged relative to plain torch in the same dtype, both against an fp64 reference
of the same kept set. The kept sets themselves are checked against masks written out element by
element here (``brute_*``), independently of the package's mask functions.
"""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from trimix_probe import DynamicSpec, ModelIdentity, TriMixConfig, patch_model, unpatch_model
from trimix_probe import dynamic as D
from trimix_probe.kernels.blockwise import blockwise_attention
from trimix_probe.kernels.vertical_slash import vertical_slash_attention


SINKS = D.SINK_COLUMNS
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: kernels run in the interpreter


def qkv(batch, heads, kv_heads, seq, head_dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, head_dim, generator=g).to(DEV, dtype)
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=g).to(DEV, dtype)
    v = torch.randn(batch, kv_heads, seq, head_dim, generator=g).to(DEV, dtype)
    return q, k, v


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def brute_vs_mask(columns, bands, seq, block):
    mask = torch.zeros(seq, seq, dtype=torch.bool)
    cols, bs = set(columns.tolist()), set(bands.tolist())
    for i in range(seq):
        for j in range(i + 1):
            mask[i, j] = j in cols or (i - j) // block in bs
    return mask.to(DEV)


def brute_block_mask(keep_blocks, seq, block):
    mask = torch.zeros(seq, seq, dtype=torch.bool)
    for i in range(seq):
        for j in range(i + 1):
            mask[i, j] = bool(keep_blocks[i // block, j // block])
    return mask.to(DEV)


def random_vs_selection(batch, heads, seq, block, n_cols, n_bands, seed):
    """A random selection (not from the estimate): scattered columns and bands, band 0 sometimes absent."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-seq // block)
    cols = torch.stack([torch.randperm(seq, generator=g)[:n_cols] for _ in range(batch * heads)]).sort(-1).values
    bands = torch.stack([torch.randperm(nb, generator=g)[:min(n_bands, nb)] for _ in range(batch * heads)])
    return D.VerticalSlash(cols.view(batch, heads, -1).to(DEV), bands.sort(-1).values.view(batch, heads, -1).to(DEV),
                           block)


CASES = [
    # batch, heads, kv_heads, seq, head_dim, block, dtype
    (2, 4, 2, 77, 64, 16, torch.bfloat16),  # batch 2, GQA 2, seq not a multiple of the block
    (1, 7, 1, 50, 64, 16, torch.float16),  # GQA 7
    (1, 2, 2, 45, 80, 32, torch.bfloat16),  # no GQA, head_dim padded to 128 lanes, 32-wide blocks
    (1, 4, 1, 16, 64, 16, torch.float16),  # one block: only the diagonal tile
    (1, 2, 1, 1, 64, 16, torch.bfloat16),  # one token
    (1, 14, 2, 300, 64, 128, torch.bfloat16),  # Qwen2.5-0.5B's heads (GQA 7) and the runtime's 128-wide bands, ragged
]


@pytest.mark.parametrize("batch,heads,kv_heads,seq,head_dim,block,dtype", CASES)
@pytest.mark.parametrize("source", ["estimate", "random"])
def test_vertical_slash_kernel_matches_reference(batch, heads, kv_heads, seq, head_dim, block, dtype, source):
    q, k, v = qkv(batch, heads, kv_heads, seq, head_dim, dtype, seed=seq + heads)
    if source == "estimate":
        spec = DynamicSpec(vertical=SINKS + 5, slash=3 * block, block_size=block, last_q=8)
        sel = D.select_vertical_slash(q, k, spec)
    else:
        sel = random_vs_selection(batch, heads, seq, block, n_cols=min(7, seq), n_bands=2, seed=seq)
    out = vertical_slash_attention(q, k, v, sel.columns, sel.bands, block_size=block)
    ref = D.vertical_slash_attention_ref(q.double(), k.double(), v.double(), sel, compute_dtype=torch.float64)
    same_dtype = D.vertical_slash_attention_ref(q, k, v, sel, compute_dtype=None)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref) <= 2 * rel_err(same_dtype, ref) + 1e-6
    # the reference's kept set is the documented one
    mask = brute_vs_mask(sel.columns[0, 0], sel.bands[0, 0], seq, block)
    ref_bf = F.scaled_dot_product_attention(q[:1, :1].double(), k[:1, :1].double(), v[:1, :1].double(), attn_mask=mask)
    torch.testing.assert_close(ref[:1, :1], ref_bf, rtol=1e-5, atol=1e-5)  # its lse is fp32



@pytest.mark.parametrize("batch,heads,kv_heads,seq,head_dim,block,dtype", CASES[:4])
@pytest.mark.parametrize("source", ["estimate", "random"])
def test_blockwise_kernel_matches_reference(batch, heads, kv_heads, seq, head_dim, block, dtype, source):
    q, k, v = qkv(batch, heads, kv_heads, seq, head_dim, dtype, seed=2 * seq + heads)
    nb = -(-seq // block)
    if source == "estimate":
        keep = D.select_blockwise(q, k, DynamicSpec(method="blockwise", gamma=0.5, block_size=block))
    else:  # any pattern, above-diagonal blocks included (the kernel must ignore them)
        keep = torch.rand(batch, heads, nb, nb, generator=torch.Generator().manual_seed(seq)) < 0.4
        keep = (keep | torch.eye(nb, dtype=torch.bool)).to(DEV)
    out = blockwise_attention(q, k, v, keep, block_size=block)
    ref = D.blockwise_attention_ref(q.double(), k.double(), v.double(), keep, block_size=block,
                                    compute_dtype=torch.float64)
    same_dtype = D.blockwise_attention_ref(q, k, v, keep, block_size=block, compute_dtype=None)
    assert rel_err(out, ref) <= 2 * rel_err(same_dtype, ref) + 1e-6
    mask = brute_block_mask(keep[0, 0].cpu(), seq, block)
    ref_bf = F.scaled_dot_product_attention(q[:1, :1].double(), k[:1, :1].double(), v[:1, :1].double(), attn_mask=mask)
    torch.testing.assert_close(ref[:1, :1], ref_bf, rtol=1e-5, atol=1e-5)  # its lse is fp32


def test_kernels_read_strided_inputs_without_copy_semantics_change():
    # [batch, seq, heads, head_dim] storage seen as [batch, heads, seq, head_dim], as transformers passes it
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(1, 4, 2, 40, 64, torch.float16, seed=7))
    assert not q.is_contiguous()
    sel = random_vs_selection(1, 4, 40, 16, n_cols=5, n_bands=2, seed=3)
    out = vertical_slash_attention(q, k, v, sel.columns, sel.bands, block_size=16)
    ref = vertical_slash_attention(q.contiguous(), k.contiguous(), v.contiguous(), sel.columns, sel.bands,
                                   block_size=16)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# -- selection on crafted inputs --------------------------------------------------------------------
SEQ, DIM, BLOCK, LAST_Q = 512, 64, 16, 32


def diffuse_qk(seed):
    """Queries sharing a direction u, keys random and small: attention is diffuse unless planted."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(DIM, generator=g)
    u = u / u.norm()
    q = 0.3 * torch.randn(1, 2, SEQ, DIM, generator=g) + 2 * u
    k = 0.3 * torch.randn(1, 1, SEQ, DIM, generator=g)
    return q, k, u


def test_planted_column_is_selected():
    q, k, u = diffuse_qk(0)
    k[..., 300, :] = 6 * u  # every query attends strongly to key 300
    spec = DynamicSpec(vertical=SINKS + 3, slash=BLOCK * 10, block_size=BLOCK, last_q=LAST_Q)
    sel = D.select_vertical_slash(q, k, spec)
    for h in range(2):
        cols = sel.columns[0, h].tolist()
        assert 300 in cols
        assert set(range(SINKS)) <= set(cols)  # sinks always kept
        assert cols == sorted(cols) and len(set(cols)) == len(cols) == SINKS + 3


def test_planted_diagonal_is_selected():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, SEQ, DIM, generator=g).expand(1, 2, SEQ, DIM)
    k = 0.3 * torch.randn(1, 1, SEQ, DIM, generator=g)
    d = 300  # key i - 300 copies query i: a strong diagonal at offset 300, band 300 // 16 = 18
    k[..., : SEQ - d, :] = 0.5 * q[:, :1, d:, :]
    n_local = -(-D.LOCAL_DIAGONALS // BLOCK)  # forced local bands
    spec = DynamicSpec(vertical=SINKS, slash=BLOCK * (n_local + 1), block_size=BLOCK, last_q=LAST_Q)
    sel = D.select_vertical_slash(q, k, spec)
    for h in range(2):
        assert sel.bands[0, h].tolist() == list(range(n_local)) + [d // BLOCK]
    # a budget smaller than the forced local bands keeps the diagonal band first
    tight = D.select_vertical_slash(q, k, DynamicSpec(vertical=4, slash=BLOCK, block_size=BLOCK, last_q=LAST_Q))
    assert tight.bands[0, 0].tolist() == [0] and tight.columns[0, 0].tolist() == [0, 1, 2, 3]


def test_diagonal_sums_brute_force():
    probs = torch.rand(2, 5, 13, dtype=torch.float64)
    got = D.diagonal_sums(probs)
    want = torch.zeros(2, 13, dtype=torch.float64)
    for r in range(5):
        pos = 13 - 5 + r
        for j in range(pos + 1):
            want[:, pos - j] += probs[:, r, j]
    torch.testing.assert_close(got, want)


def explicit_vs_scores(q, k, last_q, block, scale, softcap=None):
    """The estimate's column and band scores written out in float64, row by row (independent of
    the package's reference): softmax of each last row over its causal keys, then the sums."""
    batch, heads, seq, _ = q.shape
    group = heads // k.shape[1]
    nb = -(-seq // block)
    col = torch.zeros(batch, heads, seq, dtype=torch.float64)
    band = torch.zeros(batch, heads, nb, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for pos in range(seq - last_q, seq):
                s = (k[b, h // group, :pos + 1].double() @ q[b, h, pos].double()) * scale
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                p = torch.softmax(s, 0).cpu()
                col[b, h, :pos + 1] += p
                for j in range(pos + 1):
                    band[b, h, (pos - j) // block] += p[j]
    return col, band


ESTIMATE_CASES = {
    # batch, heads, kv_heads, seq, head_dim, last_q, block, softcap
    "gqa4-seq-not-multiple": (1, 4, 1, 77, 64, 16, 16, None),
    "batch2-gqa2-block32": (2, 4, 2, 70, 64, 24, 32, None),
    "gqa7-last-q-over-64-rows": (1, 7, 1, 90, 64, 70, 16, None),  # two row blocks of the kernel
    "no-gqa-head-dim-80-softcap": (1, 2, 2, 45, 80, 45, 16, 5.0),  # every row a last row, padded head_dim
    "seq-below-block": (1, 2, 1, 40, 64, 16, 64, None),  # one partial tile
}


@pytest.mark.parametrize("case", ESTIMATE_CASES.values(), ids=ESTIMATE_CASES.keys())
def test_estimate_kernel_matches_the_formula(case):
    """The fused estimate (Triton, interpreter on CPU) against the float64 formula, with the package's
    fp32 torch reference as the yardstick: the kernel's error is at most twice the reference's, plus
    a small floor (the sums are of probabilities, up to last_q)."""
    from trimix_probe.kernels.vertical_slash_estimate import vertical_slash_scores

    batch, heads, kv, seq, d, last_q, block, cap = case
    q, k, _ = qkv(batch, heads, kv, seq, d, torch.bfloat16, seed=seq + heads)
    k = k * 2  # peakier rows than unit-variance keys give
    scale = 1 / math.sqrt(d)
    want_col, want_band = explicit_vs_scores(q, k, last_q, block, scale, cap)
    col, band = vertical_slash_scores(q, k, last_q=last_q, block_size=block, scale=scale, softcap=cap)
    ref_col, ref_band = D.vertical_slash_scores_ref(q.float(), k.float(), last_q, block, scale, cap)
    assert col.shape == want_col.shape and band.shape == want_band.shape and col.dtype == torch.float32
    for got, ref, want in ((col, ref_col, want_col), (band, ref_band, want_band)):
        err = (got.double().cpu() - want).abs().max().item()
        err_ref = (ref.double().cpu() - want).abs().max().item()
        assert err <= 2 * err_ref + 1e-5, (err, err_ref)
    # every row's probabilities sum to 1, in columns and in bands alike
    torch.testing.assert_close(col.sum(-1).cpu(), torch.full((batch, heads), float(last_q)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(band.sum(-1).cpu(), torch.full((batch, heads), float(last_q)), rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("seq", [8191, 40000])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (14, 2, 64)])  # Llama-3.1-8B, Qwen2.5-0.5B
def test_gpu_estimate_kernel_matches_reference(seq, heads, kv_heads, head_dim):
    """Full-size shapes on the GPU (bf16, block 128, last_q 64): the fused scores against the fp32
    torch reference on fresh random inputs; the selections they give agree on nearly every entry."""
    from trimix_probe.kernels.vertical_slash_estimate import vertical_slash_scores

    q, k, _ = qkv(1, heads, kv_heads, seq, head_dim, torch.bfloat16, seed=seq)
    k = k * 2
    scale = head_dim ** -0.5
    col, band = vertical_slash_scores(q, k, last_q=64, block_size=128, scale=scale)
    ref_col, ref_band = D.vertical_slash_scores_ref(q, k, 64, 128, scale)
    torch.testing.assert_close(col, ref_col, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(band, ref_band, rtol=1e-4, atol=1e-5)


def test_estimate_kernel_and_reference_select_alike():
    """select_vertical_slash on bf16 inputs (the kernel's path) and on the same values in fp32 (the
    reference's) keep the same columns and bands, on a pattern with planted columns and a band."""
    q, k, u = diffuse_qk(4)
    k[..., [70, 130, 190], :] = 6 * u  # three strong columns: the budget's free columns
    spec = DynamicSpec(vertical=SINKS + 3, slash=8 * BLOCK, block_size=BLOCK, last_q=LAST_Q)
    qb, kb = q.to(DEV, torch.bfloat16), k.to(DEV, torch.bfloat16)
    got = D.select_vertical_slash(qb, kb, spec)
    want = D.select_vertical_slash(qb.float(), kb.float(), spec)
    assert {70, 130, 190} <= set(got.columns[0, 0].tolist())
    assert torch.equal(got.columns, want.columns) and torch.equal(got.bands, want.bands)


def test_blockwise_selection_planted_block_and_forced_blocks():
    q, k, u = diffuse_qk(2)
    k[..., 5 * BLOCK:6 * BLOCK, :] = 16 * u  # key block 5 holds most of every later query block's mass
    keep = D.select_blockwise(q, k, DynamicSpec(method="blockwise", gamma=0.5, block_size=BLOCK))
    nb = SEQ // BLOCK
    assert keep.shape == (1, 2, nb, nb)
    assert not keep.triu(1).any()  # block-causal
    assert keep[..., 0].all() and keep.diagonal(dim1=-2, dim2=-1).all()  # block 0 and the diagonal always
    # after block 5: block 5 alone passes gamma, plus the two forced blocks
    want = torch.zeros(nb, dtype=torch.bool)
    want[[0, 5]] = True
    for m in range(6, nb):
        assert keep[0, :, m].eq(want | (torch.arange(nb) == m)).all(), m
    more = D.select_blockwise(q, k, DynamicSpec(method="blockwise", gamma=0.99, block_size=BLOCK))
    assert (more | keep).eq(more).all() and more.sum() > 2 * keep.sum()  # a larger gamma keeps a superset


def test_full_budgets_keep_every_causal_entry():
    q, k, _ = qkv(1, 2, 1, 70, 64, torch.float32, seed=5)
    sel = D.select_vertical_slash(q, k, DynamicSpec(vertical=1, slash=70, block_size=16))
    assert sel.bands[0, 0].tolist() == list(range(5))
    sel = D.select_vertical_slash(q, k, DynamicSpec(vertical=1000, slash=1, block_size=16))
    assert sel.columns[0, 0].tolist() == list(range(70))
    keep = D.select_blockwise(q, k, DynamicSpec(method="blockwise", gamma=1.0, block_size=16))
    assert torch.equal(keep[0, 0].cpu(), torch.ones(5, 5, dtype=torch.bool).tril())


def test_estimate_scores_in_fp32():
    """Regression (issue 24): on CUDA the estimate multiplied bf16 q and k into bf16 scores, rounding q.k
    to steps of 4 where logits reach ~750 (a large offset shared by the keys, as Qwen2.5's shallow layers
    have); the selection then differed from the one on the same values in fp32. Now both are the same.
    (On CPU the old code already took fp32: this fails there only against a copy of the old CUDA branch.)"""
    g = torch.Generator().manual_seed(3)
    u = torch.randn(DIM, generator=g)
    u = u / u.norm()
    q = (30 * u + 0.3 * torch.randn(1, 2, SEQ, DIM, generator=g)).to(DEV, torch.bfloat16)
    k = (25 * u + 0.05 * torch.randn(1, 1, SEQ, DIM, generator=g)).to(DEV, torch.bfloat16)  # q.k ~ 750 +- 2
    spec = DynamicSpec(vertical=SINKS + 16, slash=4 * BLOCK, block_size=BLOCK, last_q=LAST_Q)
    got = D.select_vertical_slash(q, k, spec)
    want = D.select_vertical_slash(q.float(), k.float(), spec)
    assert torch.equal(got.columns, want.columns) and torch.equal(got.bands, want.bands)


def test_columns_skip_keys_only_dense_rows_see():
    """Regression (issue 24): the last_q rows rank their own neighbours high, so vertical columns went to
    keys in the last dense_last rows, which only those rows (computed dense) can see; SmolLM2 at 2K spent
    21 of 32 free columns there. Now the columns go to earlier keys, unless the budget exceeds them."""
    q, k, _ = diffuse_qk(4)
    k[..., SEQ - 40:, :] *= 8  # the last rows' own neighbourhood holds their mass
    n = 24
    spec = DynamicSpec(vertical=SINKS + 16, slash=2 * BLOCK, block_size=BLOCK, last_q=LAST_Q, dense_last=n)
    cols = D.select_vertical_slash(q, k, spec).columns
    assert (cols < SEQ - n).all()
    assert (D.select_vertical_slash(q, k, replace(spec, dense_last=0)).columns >= SEQ - n).any()  # as before
    every = D.select_vertical_slash(q, k, replace(spec, vertical=SEQ)).columns
    assert every[0, 0].tolist() == list(range(SEQ))


# -- dispatch and errors ------------------------------------------------------------------------------
def test_fallback_note_names_the_lengths_that_run_dense(monkeypatch):
    spec = DynamicSpec(vertical=1000, slash=6096, block_size=128)
    # worst case (2 * 48 bands * 128 + 1000) / (seq / 2): 81% of dense at 32704, 20% at 128K
    note = D.fallback_note(spec, 32704)
    assert note is not None and "81%" in note and "run dense" in note
    assert D.fallback_note(spec, 131072) is None
    assert D.fallback_note(DynamicSpec(method="blockwise", gamma=0.9), 1000) is None
    monkeypatch.setenv("TRIMIX_DYNAMIC_DENSE_ABOVE", "inf")
    assert D.fallback_note(spec, 32704) is None


def test_dense_fallback_when_the_budget_covers_most_of_the_mask():
    q, k, v = qkv(1, 4, 2, 64, 64, torch.float16, seed=9)
    spec = DynamicSpec(vertical=16, slash=64, block_size=16)
    assert D.work_share(spec, 64) > D.DENSE_ABOVE
    got = D.dynamic_attention(q, k, v, spec)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(got, want)
    assert D.work_share(DynamicSpec(), 131072) < D.DENSE_ABOVE < D.work_share(DynamicSpec(), 32768)


@pytest.mark.parametrize("method", ["vertical_slash", "blockwise"])
def test_dynamic_attention_sparse_path_matches_reference(method):
    q, k, v = qkv(1, 4, 2, 160, 64, torch.bfloat16, seed=11)
    spec = DynamicSpec(method=method, vertical=SINKS + 2, slash=32, gamma=0.6, block_size=16, last_q=8)
    got = D.dynamic_attention(q, k, v, spec, dense_above=2.0)
    if method == "vertical_slash":
        ref = D.vertical_slash_attention_ref(q.double(), k.double(), v.double(), D.select_vertical_slash(q, k, spec),
                                             compute_dtype=torch.float64)
    else:
        ref = D.blockwise_attention_ref(q.double(), k.double(), v.double(), D.select_blockwise(q, k, spec),
                                        block_size=16, compute_dtype=torch.float64)
    assert rel_err(got, ref) < 2e-2
    dense = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(2, 1),
                                           v.double().repeat_interleave(2, 1), is_causal=True)
    assert rel_err(got, dense) > 5e-2  # the sparse path really drops entries


@pytest.mark.parametrize("method", ["vertical_slash", "blockwise"])
def test_dense_last_rows_attend_to_every_key(method):
    """dense_last=n: rows >= seq - n see the whole causal prefix, the others keep the sparse pattern;
    the reference is a softmax over a mask written out here (pattern rows from the brute masks)."""
    batch, heads, kv_heads, seq, block, n = 1, 4, 2, 150, 16, 21
    q, k, v = qkv(batch, heads, kv_heads, seq, 64, torch.bfloat16, seed=13)
    spec = DynamicSpec(method=method, vertical=SINKS + 2, slash=32, gamma=0.5, block_size=block, last_q=8,
                       dense_last=n)
    got = D.dynamic_attention(q, k, v, spec, dense_above=2.0)
    if method == "vertical_slash":
        sel = D.select_vertical_slash(q, k, spec)
        masks = [brute_vs_mask(sel.columns[0, h].cpu(), sel.bands[0, h].cpu(), seq, block) for h in range(heads)]
    else:
        keep = D.select_blockwise(q, k, spec)
        masks = [brute_block_mask(keep[0, h].cpu(), seq, block) for h in range(heads)]
    rows = torch.arange(seq, device=DEV)[:, None]
    exact = (rows >= seq - n) & (torch.arange(seq, device=DEV)[None, :] <= rows)
    group = heads // kv_heads
    for h, m in enumerate(masks):
        full = m | exact
        s = (q[0, h].double() @ k[0, h // group].double().T) / math.sqrt(64)
        ref = s.masked_fill(~full, float("-inf")).softmax(-1) @ v[0, h // group].double()
        assert rel_err(got[0, h], ref) < 2e-2
        assert not torch.equal(m[seq - n:], exact[seq - n:])  # the pattern alone would drop entries there
    sparse_only = D.dynamic_attention(q, k, v, replace(spec, dense_last=0), dense_above=2.0)
    torch.testing.assert_close(got[:, :, :seq - n], sparse_only[:, :, :seq - n], atol=0, rtol=0)


def capped_sink_softmax(s, keep, softcap, sink):
    """fp64 softmax of scores ``s`` [rows, keys] with Gemma-2's softcap and gpt-oss's sink column, kept ``keep``."""
    s = (softcap * torch.tanh(s / softcap)).masked_fill(~keep, float("-inf"))
    s = torch.cat([s, torch.full_like(s[:, :1], sink)], 1)  # the sink: a column without a value
    return s.softmax(-1)[:, :-1]


@pytest.mark.parametrize("method", ["vertical_slash", "blockwise"])
def test_dynamic_attention_honours_softcap_and_sinks(method):
    """softcap and sinks reach the sparse path (kernel, or reference off Triton), the exact last rows and the
    dense fallback: each against a softmax written out here over the kept set, fp64."""
    batch, heads, kv_heads, seq, block, n = 1, 4, 2, 150, 16, 21
    q, k, v = qkv(batch, heads, kv_heads, seq, 64, torch.bfloat16, seed=17)
    sinks = torch.randn(heads, generator=torch.Generator().manual_seed(5)).to(DEV)
    softcap = 1.0  # where tanh bends scores of size ~1
    spec = DynamicSpec(method=method, vertical=SINKS + 2, slash=32, gamma=0.5, block_size=block, last_q=8,
                       dense_last=n)
    got = D.dynamic_attention(q, k, v, spec, dense_above=2.0, softcap=softcap, sinks=sinks)
    if method == "vertical_slash":
        sel = D.select_vertical_slash(q, k, spec, softcap=softcap)
        masks = [brute_vs_mask(sel.columns[0, h].cpu(), sel.bands[0, h].cpu(), seq, block) for h in range(heads)]
    else:
        keep = D.select_blockwise(q, k, spec, softcap=softcap)
        masks = [brute_block_mask(keep[0, h].cpu(), seq, block) for h in range(heads)]
    rows = torch.arange(seq, device=DEV)[:, None]
    causal = torch.arange(seq, device=DEV)[None, :] <= rows
    exact = (rows >= seq - n) & causal
    group = heads // kv_heads
    dense = D.dynamic_attention(q, k, v, spec, dense_above=0.0, softcap=softcap, sinks=sinks)  # the fallback
    plain = D.dynamic_attention(q, k, v, spec, dense_above=2.0)
    for h, m in enumerate(masks):
        s = (q[0, h].double() @ k[0, h // group].double().T) / math.sqrt(64)
        vh = v[0, h // group].double()
        ref = capped_sink_softmax(s, m.to(DEV) | exact, softcap, sinks[h].item()) @ vh
        assert rel_err(got[0, h], ref) < 2e-2
        assert rel_err(plain[0, h], ref) > 5e-2  # without them the answer differs
        assert rel_err(dense[0, h], capped_sink_softmax(s, causal, softcap, sinks[h].item()) @ vh) < 2e-2


@pytest.mark.parametrize("batch,heads,kv_heads,seq,n", [(2, 7, 1, 40, 9), (1, 14, 2, 33, 33), (1, 3, 3, 20, 50)])
def test_dense_last_rows_per_head_loop(batch, heads, kv_heads, seq, n):
    """The folded-group SDPA against a loop over (batch, head, row) of plain causal softmax, fp64;
    rows before the last n untouched."""
    g = torch.Generator().manual_seed(seq + heads)
    q = torch.randn(batch, heads, seq, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(batch, kv_heads, seq, 16, generator=g, dtype=torch.float64) for _ in range(2))
    out = torch.full_like(q, 7.0)
    D.dense_last_rows(out, q, k, v, n, scale=0.3)
    group = heads // kv_heads
    for b in range(batch):
        for h in range(heads):
            for i in range(seq):
                if i < seq - n:
                    assert (out[b, h, i] == 7.0).all()
                    continue
                p = (q[b, h, i] @ k[b, h // group, :i + 1].T * 0.3).softmax(-1)
                torch.testing.assert_close(out[b, h, i], p @ v[b, h // group, :i + 1])


def test_work_share_counts_dense_last_rows():
    spec = DynamicSpec(vertical=100, slash=256, block_size=128)
    seq = 8192
    sparse_row = 2 * 2 * 128 + 100
    assert D.work_share(spec, seq) == pytest.approx(sparse_row / (seq / 2))
    with_last = replace(spec, dense_last=512)
    assert D.work_share(with_last, seq) == pytest.approx(((seq - 512) * sparse_row + 512 * seq) / (seq * seq / 2))
    assert D.work_share(replace(spec, dense_last=seq), seq) == 1.0  # every row dense: capped at dense's work
    assert D.work_share(DynamicSpec(vertical=1000, slash=6096), 1024) == 1.0


@pytest.mark.parametrize("bad,match", [
    (dict(dtype=torch.float32), "accepted: torch.float16, torch.bfloat16"),
    (dict(head_dim=48), "head_dim 48"),
    (dict(block=24), "block_size 24"),
    (dict(kv_heads=3), "multiple of kv_heads"),
])
def test_kernels_refuse_unsupported_input(bad, match):
    args = dict(dtype=torch.float16, head_dim=64, block=16, kv_heads=2) | bad
    q, k, v = qkv(1, 4, args["kv_heads"], 20, args["head_dim"], args["dtype"], seed=1)
    cols, bands = torch.zeros(1, 4, 1, dtype=torch.long, device=DEV), torch.zeros(1, 4, 1, dtype=torch.long, device=DEV)
    with pytest.raises(ValueError, match=match):
        vertical_slash_attention(q, k, v, cols, bands, block_size=args["block"])
    nb = -(-20 // args["block"])
    with pytest.raises(ValueError, match=match):
        blockwise_attention(q, k, v, torch.ones(1, 4, nb, nb, dtype=torch.bool, device=DEV), block_size=args["block"])


# -- integration ------------------------------------------------------------------------------------
def make_tiny(dtype):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval().to(DEV, dtype)
    model.set_attn_implementation("sdpa")
    return model


def dynamic_plan(model, spec, starting_layer=2):
    return TriMixConfig.triangle_from(ModelIdentity.from_hf_config(model.config), starting_layer, n_init=2,
                                      n_local=16, last_n=4, shallow="dynamic", dynamic=spec)


@pytest.mark.parametrize("spec", [
    DynamicSpec(vertical=1000, slash=1, block_size=16, last_q=8),  # every column: the causal mask
    DynamicSpec(vertical=1, slash=1000, block_size=16, last_q=8),  # every band: the causal mask
    DynamicSpec(method="blockwise", gamma=1.0, block_size=16),  # every block
    DynamicSpec(vertical=1, slash=1, block_size=16, last_q=8, dense_last=1000),  # tiny budget, every row dense
    DynamicSpec(method="blockwise", gamma=0.1, block_size=16, dense_last=53),  # likewise, rows = the prompt
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # torch reference path / Triton kernels
def test_full_budget_dynamic_plan_reproduces_dense(spec, dtype, monkeypatch):
    monkeypatch.setenv("TRIMIX_DYNAMIC_DENSE_ABOVE", "inf")  # the sparse path, not the dense fallback
    ids = torch.randint(0, 97, (2, 53), device=DEV)
    model = make_tiny(dtype)
    with torch.no_grad():
        exact = make_tiny(torch.float64)(ids).logits
        expected = model(ids).logits.double()
        patch_model(model, dynamic_plan(model, spec, starting_layer=3))
        got = model(ids).logits.double()
    assert rel_err(got, exact) <= 2 * rel_err(expected, exact) + 1e-6


def test_decode_after_a_sparse_prefill_is_dense_over_the_cache(monkeypatch):
    """generate() after a dynamic prefill (issue 24, candidate: the decode / cache path): dynamic attention
    is called once per dynamic layer, on the whole prompt (q_len == k_len), never by a decode step; and
    each decode step's logits are those of the unpatched model run on the cache the sparse prefill left."""
    from transformers import DynamicCache

    monkeypatch.setenv("TRIMIX_DYNAMIC_DENSE_ABOVE", "inf")
    ids = torch.randint(1, 97, (1, 90), device=DEV)
    model = make_tiny(torch.float32)
    spec = DynamicSpec(vertical=SINKS, slash=32, block_size=16, last_q=8, dense_last=4)
    calls = []
    orig = D.dynamic_attention

    def recording(q, k, v, sp, **kw):
        calls.append((q.shape[2], k.shape[2]))
        return orig(q, k, v, sp, **kw)

    monkeypatch.setattr(D, "dynamic_attention", recording)
    with torch.no_grad():
        patch_model(model, dynamic_plan(model, spec))
        gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
        assert calls == [(90, 90), (90, 90)]  # layers 0 and 1, the prefill only
        cache = DynamicCache(config=model.config)
        step = model(ids, past_key_values=cache, use_cache=True).logits[0, -1]
        unpatch_model(model)
        want = [step]
        for tok in gen.sequences[0, 90:93]:
            want.append(model(tok.view(1, 1), past_key_values=cache, use_cache=True).logits[0, -1])
    for got, ref in zip(gen.logits, want):
        torch.testing.assert_close(got[0], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["vertical_slash", "blockwise"])
def test_sparse_dynamic_plan_runs_end_to_end(method, monkeypatch):
    monkeypatch.setenv("TRIMIX_DYNAMIC_DENSE_ABOVE", "inf")
    ids = torch.randint(1, 97, (1, 90), device=DEV)  # no pad token (0): generate would mask it as padding
    model = make_tiny(torch.bfloat16)
    with torch.no_grad():
        dense = model(ids).logits.float()
        spec = DynamicSpec(method=method, vertical=SINKS, slash=32, gamma=0.3, block_size=16, last_q=8)
        patch_model(model, dynamic_plan(model, spec))
        got = model(ids).logits.float()
        gen = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert torch.isfinite(got).all() and gen.shape == (1, 92)
    assert (got - dense).abs().max() > 1e-2  # layers 0-1 really are sparse
    assert math.isfinite(got.std().item())
