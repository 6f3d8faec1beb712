"""Dynamic sparse attention for shallow layers: estimate a pattern per head, then attend to it exactly.

Two methods (``DynamicSpec.method``), both causal prefill, ``B = spec.block_size``:

``vertical_slash`` (MInference-style). From the last ``last_q`` queries against all keys, per head:

    probs   = softmax(q[-last_q:] @ k.T * scale, causal)          # [last_q, seq]
    column  = probs.sum(rows)                                      # [seq]: vertical score of key j
    diag[d] = sum_r probs[r, pos_r - d]                            # [seq]: slash score of diagonal d
    band[o] = diag[o*B : (o+1)*B].sum()                            # diagonals pooled in bands of B

keep the top ``vertical`` columns (the first ``SINK_COLUMNS`` always among them; none of the keys that only
the ``dense_last`` rows see, unless the budget exceeds the others) and the top
``ceil(slash / B)`` bands (those covering the first ``LOCAL_DIAGONALS`` diagonals always among
them). Row ``i`` then keeps key ``j <= i`` iff ``j`` is a kept column or ``(i - j) // B`` is a kept
band. Slash diagonals are kept in bands of ``B`` so that the kernel works on whole tiles and the
cost is bounded by the budget whatever the pattern (a scattered diagonal costs one tile pair).

``blockwise`` (FlexPrefill-style). Per head, mean-pool queries and keys over blocks of ``B``:

    probs = softmax(q_pool @ k_pool.T * scale, block-causal)      # [n_blocks, n_blocks]

and keep, per query block, the key blocks of largest ``probs`` until their cumulative mass reaches
``gamma`` (the diagonal block and block 0 always). Row ``i`` keeps key ``j <= i`` iff
``(i // B, j // B)`` is kept.

Kernels: ``trimix_probe.kernels.vertical_slash`` and ``trimix_probe.kernels.blockwise`` (Triton, on
CUDA or under TRITON_INTERPRET=1); the references here compute the same kept sets with
:func:`trimix_probe.reference.masked_attention`. Where the budget keeps most of the causal mask
anyway, :func:`dynamic_attention` runs dense attention instead (see ``DENSE_ABOVE``).

``DynamicSpec.dense_last = N`` (both methods): the last N rows attend to every key, exactly
(:func:`dense_last_rows`), as the triangle layers' ``last_n`` rows do.

``softcap`` and ``sinks`` (Gemma-2, gpt-oss; as in :func:`trimix_probe.reference.masked_attention`)
are honoured by the attention over the kept set, the dense fallback and the exact last rows; the
estimate applies the softcap to its scores and leaves the sinks out (they scale a row's probabilities
by one factor, which moves no column or band within the row).

Measurements (speed, accuracy, recall of the patterns) and the models and GPUs they were made on:
docs/performance.md, docs/accuracy.md, docs/recall.md.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import DynamicSpec
from .ops import dense_causal, triangle, use_triton
from .reference import MaskFn, masked_attention
from .triangle_sdpa import dense_last_rows

SINK_COLUMNS = 32  # first keys always kept as vertical columns (MInference keeps 30)
LOCAL_DIAGONALS = 128  # diagonals i - j < 128 always kept (MInference keeps 100), rounded up to bands
DENSE_ABOVE = 0.5  # run dense when the sparse kernel's worst-case work passes this share of causal attention
_HEAD_CHUNK_BYTES = 1 << 28  # bound on the fp32 [heads, last_q, seq] estimate held at once


@dataclass(frozen=True)
class VerticalSlash:
    """A vertical-slash selection. columns: [batch, heads, n_cols] sorted distinct key indices;
    bands: [batch, heads, n_bands] sorted distinct band indices (band o = diagonals [o*B, (o+1)*B))."""

    columns: torch.Tensor
    bands: torch.Tensor
    block_size: int


# -- estimation ----------------------------------------------------------------------------------
def _last_q_probs(q: torch.Tensor, k: torch.Tensor, heads: slice, last_q: int, scale: float,
                  softcap: float | None = None) -> torch.Tensor:
    """softmax of the last ``last_q`` queries of ``heads`` against all keys, causal, fp32.
    q: [batch, heads, seq, d]; k: [batch, kv_heads, seq, d] -> [batch, len(heads), last_q, seq]."""
    batch, n_heads, seq, d = q.shape
    group = n_heads // k.shape[1]
    h0, h1 = heads.start, heads.stop  # whole kv groups: h0, h1 multiples of group
    ql = q[:, h0:h1, seq - last_q:].reshape(batch, (h1 - h0) // group, group * last_q, d)
    kk = k[:, h0 // group:h1 // group]
    # fp32 scores, also for bf16 inputs: a bf16 matmul rounds q.k before the softmax, to steps of 2-4 where
    # logits reach hundreds (Qwen2.5's shallow layers), which reorders the columns and bands; the estimate
    # is last_q rows, so fp32 costs little (tests/test_dynamic.py::test_estimate_scores_in_fp32)
    dt = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(ql.to(dt), kk.to(dt).transpose(-1, -2)).float() * scale  # [b, kv, group*last_q, seq]
    scores = scores.view(batch, h1 - h0, last_q, seq)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    pos = torch.arange(seq - last_q, seq, device=q.device)[:, None]  # [last_q, 1]
    scores.masked_fill_(torch.arange(seq, device=q.device)[None, :] > pos, float("-inf"))
    return scores.softmax(-1)


def _head_chunks(q: torch.Tensor, k: torch.Tensor, last_q: int):
    """Slices of whole kv groups whose fp32 estimate fits ``_HEAD_CHUNK_BYTES``."""
    batch, heads, seq, _ = q.shape
    group = heads // k.shape[1]
    per_group = batch * group * last_q * seq * 4
    step = group * max(1, _HEAD_CHUNK_BYTES // max(per_group, 1))
    return [slice(h, min(h + step, heads)) for h in range(0, heads, step)]


def diagonal_sums(probs: torch.Tensor) -> torch.Tensor:
    """probs: [..., last_q, seq] (rows are the last positions) -> [..., seq]: entry d sums probs over
    the diagonal i - j = d."""
    last_q, seq = probs.shape[-2:]
    pos = torch.arange(seq - last_q, seq, device=probs.device)[:, None]
    j = pos - torch.arange(seq, device=probs.device)[None, :]  # [last_q, seq]: key on diagonal d of row r
    vals = probs.gather(-1, j.clamp(min=0).expand(*probs.shape[:-2], last_q, seq))
    return vals.masked_fill(j < 0, 0.0).sum(-2)


def vertical_slash_scores_ref(q: torch.Tensor, k: torch.Tensor, last_q: int, block_size: int, scale: float,
                              softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``kernels.vertical_slash_estimate.vertical_slash_scores``: the column and band
    scores of the last ``last_q`` queries (module docstring), through the fp32 probabilities, a few
    heads at a time. q: [batch, heads, seq, d]; k: [batch, kv_heads, seq, d] -> (col [batch, heads,
    seq], band [batch, heads, cdiv(seq, block_size)]), fp32."""
    batch, heads, seq, _ = q.shape
    B = block_size
    n_bands = -(-seq // B)
    col_score = torch.empty(batch, heads, seq, device=q.device)
    band_score = torch.empty(batch, heads, n_bands, device=q.device)
    for hs in _head_chunks(q, k, last_q):
        probs = _last_q_probs(q, k, hs, last_q, scale, softcap)  # [batch, heads, last_q, seq]
        col_score[:, hs] = probs.sum(-2)
        diag = F.pad(diagonal_sums(probs), (0, n_bands * B - seq))
        band_score[:, hs] = diag.view(batch, -1, n_bands, B).sum(-1)
        del probs
    return col_score, band_score


def select_vertical_slash(q: torch.Tensor, k: torch.Tensor, spec: DynamicSpec,
                          scale: float | None = None, softcap: float | None = None) -> VerticalSlash:
    """Estimate the vertical columns and slash bands of every head (see the module docstring).
    q: [batch, heads, seq, d]; k: [batch, kv_heads, seq, d]."""
    batch, heads, seq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    B = spec.block_size
    n_bands = -(-seq // B)
    last_q = min(spec.last_q, seq)
    n_cols = min(spec.vertical, seq)
    n_keep_bands = min(-(-spec.slash // B), n_bands)
    if _kernels_apply(q, spec):  # the fused estimate (kernels/vertical_slash_estimate.py) where the kernels run
        from .kernels.vertical_slash_estimate import vertical_slash_scores

        col_score, band_score = vertical_slash_scores(q, k, last_q=last_q, block_size=B, scale=scale, softcap=softcap)
    else:
        col_score, band_score = vertical_slash_scores_ref(q, k, last_q, B, scale, softcap)
    # forced entries outrank any estimate (scores are at most last_q), the first ones highest, so a
    # budget smaller than the forced set keeps its first entries (band 0: the diagonal)
    n_sink, n_local = min(SINK_COLUMNS, seq), min(-(-LOCAL_DIAGONALS // B), n_bands)
    col_score[..., :n_sink] = last_q + 1 + torch.arange(n_sink, 0, -1, device=q.device)
    band_score[..., :n_local] = last_q + 1 + torch.arange(n_local, 0, -1, device=q.device)
    # a column at or after the first dense_last row serves only rows computed dense; the last_q rows rank
    # their own neighbours high, so without this they took up to dense_last of the budget (chosen last now)
    col_score[..., max(seq - spec.dense_last, n_sink):] = -1.0
    columns = col_score.topk(n_cols, dim=-1).indices.sort(-1).values
    bands = band_score.topk(n_keep_bands, dim=-1).indices.sort(-1).values
    return VerticalSlash(columns=columns, bands=bands, block_size=B)


def select_blockwise(q: torch.Tensor, k: torch.Tensor, spec: DynamicSpec, scale: float | None = None,
                     softcap: float | None = None) -> torch.Tensor:
    """Kept (query block, key block) pairs of every head: [batch, heads, n_blocks, n_blocks] bool,
    block-causal (see the module docstring). q: [batch, heads, seq, d]; k: [batch, kv_heads, seq, d]."""
    batch, heads, seq, d = q.shape
    kv_heads = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    B = spec.block_size
    n_blocks = -(-seq // B)
    dt = q.dtype if q.is_cuda else torch.float32

    def pool(x: torch.Tensor) -> torch.Tensor:  # [b, h, seq, d] -> [b, h, n_blocks, d], mean over each block's rows
        x = F.pad(x.to(dt), (0, 0, 0, n_blocks * B - seq)).view(*x.shape[:2], n_blocks, B, d).float().sum(-2)
        rows = torch.full((n_blocks,), B, device=x.device, dtype=torch.float32)
        rows[-1] = seq - (n_blocks - 1) * B
        return x / rows[:, None]

    qp = pool(q).view(batch, kv_heads, heads // kv_heads * n_blocks, d)
    scores = (qp @ pool(k).transpose(-1, -2) * scale).view(batch, heads, n_blocks, n_blocks)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    causal = torch.ones(n_blocks, n_blocks, dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    vals, order = probs.sort(-1, descending=True)
    before = vals.cumsum(-1) - vals  # mass of the larger blocks: keep until it reaches gamma
    keep_sorted = (before < spec.gamma) & (vals > 0)
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    keep |= torch.eye(n_blocks, dtype=torch.bool, device=q.device)
    keep[..., 0] = True
    return keep & causal


# -- kept sets and references ---------------------------------------------------------------------
def vertical_slash_mask_fn(sel: VerticalSlash, batch: int, head: int, seq: int) -> MaskFn:
    """Mask of one (batch, head) of a vertical-slash selection: j <= i and (j a column or (i - j) // B a band)."""
    is_col = torch.zeros(seq, dtype=torch.bool, device=sel.columns.device)
    is_col[sel.columns[batch, head]] = True
    is_band = torch.zeros(-(-seq // sel.block_size), dtype=torch.bool, device=sel.bands.device)
    is_band[sel.bands[batch, head]] = True

    def fn(q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        causal = kv_idx <= q_idx
        band = is_band[((q_idx - kv_idx).clamp(min=0) // sel.block_size)]
        return causal & (is_col[kv_idx] | band)

    return fn


def blockwise_mask_fn(keep_blocks: torch.Tensor, batch: int, head: int, block_size: int) -> MaskFn:
    """Mask of one (batch, head) of a blockwise selection: j <= i and (i // B, j // B) kept."""
    kb = keep_blocks[batch, head]

    def fn(q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (kv_idx <= q_idx) & kb[q_idx // block_size, kv_idx // block_size]

    return fn


def _per_head(q, k, v, mask_fn_of, scale, compute_dtype, softcap=None, sinks=None) -> torch.Tensor:
    """masked_attention with a different mask per (batch, head)."""
    batch, heads = q.shape[:2]
    group = heads // k.shape[1]
    out = q.new_empty(*q.shape[:3], v.shape[-1])  # v's head_dim (MLA: not q's)
    for b in range(batch):
        for h in range(heads):
            out[b:b + 1, h:h + 1] = masked_attention(
                q[b:b + 1, h:h + 1], k[b:b + 1, h // group:h // group + 1], v[b:b + 1, h // group:h // group + 1],
                mask_fn_of(b, h), scale=scale, compute_dtype=compute_dtype, softcap=softcap,
                sinks=None if sinks is None else sinks[h:h + 1])[0]
    return out


def vertical_slash_attention_ref(q, k, v, sel: VerticalSlash, *, scale: float | None = None,
                                 compute_dtype: torch.dtype | None = torch.float32, softcap: float | None = None,
                                 sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of ``kernels.vertical_slash.vertical_slash_attention`` (same kept set), pure torch."""
    seq = q.shape[2]
    return _per_head(q, k, v, lambda b, h: vertical_slash_mask_fn(sel, b, h, seq), scale, compute_dtype, softcap,
                     sinks)


def blockwise_attention_ref(q, k, v, keep_blocks: torch.Tensor, *, block_size: int, scale: float | None = None,
                            compute_dtype: torch.dtype | None = torch.float32, softcap: float | None = None,
                            sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of ``kernels.blockwise.blockwise_attention`` (same kept set), pure torch."""
    return _per_head(q, k, v, lambda b, h: blockwise_mask_fn(keep_blocks, b, h, block_size), scale, compute_dtype,
                     softcap, sinks)


# -- dispatch --------------------------------------------------------------------------------------
def work_share(spec: DynamicSpec, seq: int) -> float:
    """Worst-case work of the vertical-slash kernel over dense causal attention: each row visits at
    most 2 tiles of B keys per kept band and every column; dense averages seq / 2 keys a row; the
    last ``dense_last`` rows visit all their keys (about seq each). Capped at 1: past dense's work
    the bound says nothing more (and the runtime runs dense long before)."""
    bands = min(-(-spec.slash // spec.block_size), -(-seq // spec.block_size))
    last = min(spec.dense_last, seq)
    per_row = min(2 * bands * spec.block_size + min(spec.vertical, seq), seq)
    return min(((seq - last) * per_row + last * seq) / max(seq * seq / 2, 1), 1.0)


def tile_share(keep: torch.Tensor) -> torch.Tensor:
    """The blockwise kernel's work over dense causal attention's, in tiles: ``keep`` [..., n_blocks,
    n_blocks] (a :func:`select_blockwise` selection) -> [...] the share of the block-causal tiles each
    head keeps (float64; the ``dense_last`` rows recomputed afterwards are not counted). Known only after
    the estimate, unlike the vertical-slash bound (:func:`work_share`)."""
    n = keep.shape[-1]
    return keep.sum((-2, -1)).double() / (n * (n + 1) / 2)


def fallback_note(spec: DynamicSpec, seq: int) -> str | None:
    """One line when ``spec``'s layers run dense at ``seq`` tokens (vertical-slash whose worst-case
    work passes the dense fallback, so no speed-up there); None when they run sparse, and for
    blockwise, whose share is known only after the estimate."""
    if spec.method != "vertical_slash":
        return None
    share, limit = work_share(spec, seq), dense_above_limit()
    if share <= limit:
        return None
    return (f"at {seq} tokens the vertical-slash budget ({spec.vertical} vertical, {spec.slash} slash) bounds the "
            f"sparse work at {share:.0%} of dense causal attention, above the dense fallback at {limit:.0%}: the "
            "dynamic layers run dense there (no speed-up). Lower the budget (--vertical/--slash) for a sparse "
            "run, and check its answers with `trimix-probe recall` and `trimix-probe eval`")


def dense_above_limit() -> float:
    """The dense fallback's share: ``DENSE_ABOVE``, or the TRIMIX_DYNAMIC_DENSE_ABOVE environment variable."""
    env = os.environ.get("TRIMIX_DYNAMIC_DENSE_ABOVE")
    return DENSE_ABOVE if env is None else float(env)


def _kernels_apply(t: torch.Tensor, spec: DynamicSpec, value_dim: int | None = None) -> bool:
    """The kernels run on CUDA (or under TRITON_INTERPRET=1) for the dtypes, head dims and block sizes
    they take, with one head_dim for q, k and v (``value_dim``: v's, when it is not ``t``'s, as in
    DeepSeek's MLA); anything else goes to the exact torch reference (slower)."""
    from .kernels.vertical_slash import BLOCK_SIZES, DTYPES, HEAD_DIMS

    return (use_triton(t) and t.dtype in DTYPES and t.shape[-1] in HEAD_DIMS and spec.block_size in BLOCK_SIZES
            and value_dim in (None, t.shape[-1]))


def dynamic_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spec: DynamicSpec, *,
                      scale: float | None = None, dense_above: float | None = None, softcap: float | None = None,
                      sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic sparse causal prefill attention following ``spec``.

    query: [batch, heads, seq, head_dim]; key, value: [batch, kv_heads, seq, head_dim] (GQA, no copy;
    value's head_dim may differ, as in DeepSeek's MLA: the torch paths then).
    Returns [batch, heads, seq, value's head_dim]. Triton kernels on CUDA (or under TRITON_INTERPRET=1) for
    fp16/bf16, head_dim 64-256 and block_size 16-128; the torch reference otherwise. When the sparse work would exceed ``dense_above`` of
    dense causal attention (default ``DENSE_ABOVE``, or the TRIMIX_DYNAMIC_DENSE_ABOVE environment
    variable; > 1 never), the layer runs dense (:func:`trimix_probe.ops.dense_causal`): it keeps a superset, faster. For vertical-slash
    that share is the budget's bound (:func:`work_share`, no estimate needed); for blockwise, the
    selected tiles' share (:func:`tile_share`). ``spec.dense_last`` > 0: the last rows are then recomputed exactly
    (:func:`dense_last_rows`). ``softcap`` and ``sinks`` [heads]: honoured everywhere (module docstring);
    the dense fallback with either is the triangle whose window covers the prompt (the causal mask).
    """
    if not isinstance(spec, DynamicSpec):
        raise ValueError(f"dynamic_attention: spec must be a DynamicSpec, got {type(spec).__name__}")
    if (query.dim() != 4 or key.dim() != 4 or value.dim() != 4 or key.shape[:3] != value.shape[:3]
            or query.shape[2] != key.shape[2] or query.shape[-1] != key.shape[-1]):
        raise ValueError(f"dynamic_attention: expected query [batch, heads, seq, head_dim] and key/value [batch, "
                         f"kv_heads, seq, head_dim] of one seq (prefill), got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    if query.shape[1] % key.shape[1] != 0:
        raise ValueError(f"dynamic_attention: {query.shape[1]} query heads are not a multiple of {key.shape[1]} kv heads")
    seq = query.shape[2]
    limit = dense_above_limit() if dense_above is None else dense_above
    feats = dict(softcap=softcap, sinks=sinks)
    if softcap is None and sinks is None:
        dense = lambda: dense_causal(query, key, value, scale=scale)  # noqa: E731
    else:  # the causal mask, as a triangle whose window covers the prompt
        dense = lambda: triangle(query, key, value, n_init=0, n_local=seq, last_n=0, scale=scale, **feats)  # noqa: E731
    if seq == 0:
        return query.new_empty(*query.shape[:3], value.shape[-1])
    if spec.method == "vertical_slash":
        if work_share(spec, seq) > limit:
            return dense()
        sel = select_vertical_slash(query, key, spec, scale, softcap)
        if _kernels_apply(query, spec, value.shape[-1]):
            from .kernels.vertical_slash import vertical_slash_attention

            out = vertical_slash_attention(query, key, value, sel.columns, sel.bands, block_size=spec.block_size,
                                           scale=scale, **feats)
        else:
            out = vertical_slash_attention_ref(query, key, value, sel, scale=scale, **feats)
        return dense_last_rows(out, query, key, value, spec.dense_last, scale=scale, **feats)
    keep = select_blockwise(query, key, spec, scale, softcap)
    if limit <= 1 and tile_share(keep).mean().item() > limit:  # one host sync a layer
        return dense()
    if _kernels_apply(query, spec, value.shape[-1]):
        from .kernels.blockwise import blockwise_attention

        out = blockwise_attention(query, key, value, keep, block_size=spec.block_size, scale=scale, **feats)
    else:
        out = blockwise_attention_ref(query, key, value, keep, block_size=spec.block_size, scale=scale, **feats)
    return dense_last_rows(out, query, key, value, spec.dense_last, scale=scale, **feats)
