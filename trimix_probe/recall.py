"""``trimix-probe recall``: how much of dense attention a dynamic pattern keeps, per layer and head.

For a dynamic budget (``DynamicSpec``), on real prompts run with dense attention, each layer's
queries and keys (after RoPE) go through the same estimation the runtime uses
(:func:`trimix_probe.dynamic.select_vertical_slash` / :func:`select_blockwise`), and for every query
row ``i`` we measure its **recall**: the share of row ``i``'s dense causal softmax mass that falls on
keys the pattern keeps,

    recall[h, i] = sum_{j kept} softmax(q_i . k_j * scale)[j]          (1 = nothing lost)

Reported per layer and head: the mean over rows, the 10th percentile over rows (the rows the
pattern serves worst), and the mean over the last ``last_q`` rows (those the vertical-slash
estimate is taken from). Recall is the quantity MInference and FlexPrefill select for; it does not
say which lost mass matters for an answer (the gradient probe and ``trimix-probe eval`` do), but
it ranks budgets and shows which layers and rows a budget starves, before any accuracy run.

:func:`row_recall` gives the same measure at chosen rows only (a needle's tokens: cost ``rows x seq``,
so it runs at 128K; ``scripts/diagnose_dynamic.py``), and :func:`measuring` takes any per-layer measure.

Several budgets are measured in one pass over the prompts (``--budget`` is repeatable):
``vs:VERTICAL/SLASH`` (vertical-slash) or ``bw:GAMMA`` (blockwise), each optionally ``+denseN``
(the last N rows computed dense, ``DynamicSpec.dense_last``: recall 1 there).

Verified against a row-by-row brute force from the package's element masks (tests/test_recall.py),
on SmolLM2-135M at 4K on CPU (docs/recall.md) and with a 4-layer model split over two H200s (its
first, mask-based implementation; the current one matched it on SmolLM2 to 2.4e-7). Not run: a
long-context model on the GPU (``scripts/gpu_session.sh recall`` is written for Qwen at 32K).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import DynamicSpec
from .errors import InputError

RECALL_ATTN = "trimix_recall"
_ROW_CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 1 << 28}  # bound on the fp32 [heads, rows, seq] probabilities held at once


# ------------------------------------------------------------------------------------------- budgets
def parse_budget(text: str, block_size: int = 128, last_q: int = 64) -> DynamicSpec:
    """``vs:1000/6096`` -> vertical-slash with 1000 columns and 6096 diagonals; ``bw:0.9`` ->
    blockwise to cumulative mass 0.9; a ``+denseN`` suffix (``vs:1000/6096+dense64``) computes the
    last N rows dense (``DynamicSpec.dense_last``)."""
    t = text.strip()
    base, plus, last = t.partition("+dense")
    try:
        dense_last = int(last) if plus else 0
        m = re.fullmatch(r"vs:(\d+)/(\d+)", base)
        if m:
            return DynamicSpec(method="vertical_slash", vertical=int(m[1]), slash=int(m[2]), block_size=block_size,
                               last_q=last_q, dense_last=dense_last)
        m = re.fullmatch(r"bw:([0-9.]+)", base)
        if m:
            return DynamicSpec(method="blockwise", gamma=float(m[1]), block_size=block_size, last_q=last_q,
                               dense_last=dense_last)
    except ValueError as err:  # the spec's own check (a gamma outside (0, 1], a zero budget), a bad +denseN
        raise InputError(f"budget {text!r}: {err}") from None
    raise InputError(f"budget {text!r} is not understood; use vs:VERTICAL/SLASH (e.g. vs:1000/6096) or "
                     "bw:GAMMA (e.g. bw:0.9), optionally with +denseN (the last N rows dense, e.g. +dense64)")


def budget_name(spec: DynamicSpec) -> str:
    name = f"vs:{spec.vertical}/{spec.slash}" if spec.method == "vertical_slash" else f"bw:{spec.gamma:g}"
    return name + (f"+dense{spec.dense_last}" if spec.dense_last else "")


# ------------------------------------------------------------------------------------ one layer's recall
def _vs_recall(probs, cs, rows, sel, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical-slash recall and kept-entry count of ``rows`` without a [heads, rows, seq] mask:
    kept = columns C  u  bands S (keys j <= i with (i - j) // B in S), so

        recall(i) = P(C) + P(S) - P(C n S),   P(band b) = cs[i - b*B] - cs[i - (b+1)*B]

    with ``cs`` the row-wise cumulative sum of ``probs`` (cs[x] = 0 for x < 0); counts likewise.
    probs, cs: [heads, rows, seq]. Returns [heads, rows] recall and kept entries."""
    seq = probs.shape[-1]
    i = rows[None, :, None]                                                # [1, rows, 1]
    cols, bands = sel.columns[0], sel.bands[0]                             # [heads, n_cols], [heads, n_bands]
    # columns at or before row i, and which of them a kept band covers too
    p_col = probs.gather(-1, cols[:, None, :].expand(-1, len(rows), -1))   # 0 past the row (causal softmax)
    col_ok = cols[:, None, :] <= i
    n_bands = -(-seq // block_size)
    is_band = torch.zeros(bands.shape[0], n_bands, dtype=torch.bool, device=probs.device)
    is_band.scatter_(1, bands, True)
    col_band = ((i - cols[:, None, :]).clamp(min=0) // block_size).expand(-1, len(rows), -1)
    both = col_ok & is_band.gather(1, col_band.reshape(bands.shape[0], -1)).view_as(col_band)
    # bands: key range (i - (b+1)B, i - bB], cut at key 0
    hi = i - bands[:, None, :] * block_size                                 # [heads, rows, n_bands]
    lo = hi - block_size

    def cum(x):  # cs at key x, 0 for x < 0
        return torch.where(x >= 0, cs.gather(-1, x.clamp(min=0)), 0.0)

    valid = hi >= 0
    p_band = torch.where(valid, cum(hi) - cum(lo), 0.0).sum(-1)
    n_band = torch.where(valid, hi - lo.clamp(min=-1), 0).sum(-1)
    recall = p_col.sum(-1) + p_band - torch.where(both, p_col, 0.0).sum(-1)
    kept = col_ok.sum(-1) + n_band - both.sum(-1)                          # [heads, rows]
    return recall, kept


def _bw_recall(block_mass, rows, keep_blocks, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise recall and kept-entry count of ``rows``: block_mass [heads, rows, n_blocks] (the
    dense mass of each key block), keep_blocks [heads, n_blocks, n_blocks]. Returns [heads, rows] each."""
    qb = rows // block_size
    kept_rows = keep_blocks[:, qb, :]                                      # [heads, rows, n_blocks]
    recall = torch.where(kept_rows, block_mass, 0.0).sum(-1)
    before = torch.arange(keep_blocks.shape[-1], device=rows.device)[None, None, :] < qb[None, :, None]
    kept = (kept_rows & before).sum(-1) * block_size + (rows - qb * block_size + 1)[None, :]
    return recall, kept


def _selections(q: torch.Tensor, k: torch.Tensor, specs: dict, scale: float) -> dict:
    from .dynamic import select_blockwise, select_vertical_slash

    return {name: select_vertical_slash(q, k, s, scale) if s.method == "vertical_slash"
            else select_blockwise(q, k, s, scale)[0] for name, s in specs.items()}


def _chunks_recall(q: torch.Tensor, k: torch.Tensor, specs: dict, sels: dict, rows: torch.Tensor, scale: float):
    """Yields ``(rows_chunk, {name: (recall [heads, rows_chunk], kept [heads, rows_chunk])})`` over ``rows``
    (sorted query positions of one prompt), the dense probabilities computed once per chunk for every budget."""
    heads, seq = q.shape[1], q.shape[2]
    group = heads // k.shape[1]
    kk = k[0].float().repeat_interleave(group, dim=0)  # [heads, seq, d] (a float copy for the fp32 softmax)
    step = max(1, _ROW_CHUNK_BYTES.get(q.device.type, 1 << 28) // (heads * seq * 4 * 2))  # probs and cs
    keys = torch.arange(seq, device=q.device)
    for r0 in range(0, len(rows), step):
        chunk = rows[r0:r0 + step]
        scores = torch.matmul(q[0, :, chunk].float(), kk.transpose(-1, -2)).mul_(scale)  # [heads, rows, seq]
        scores.masked_fill_(keys[None, None, :] > chunk[None, :, None], float("-inf"))
        probs = scores.softmax(-1)
        del scores
        cs, masses, res = None, {}, {}
        for name, s in specs.items():
            if s.method == "vertical_slash":
                cs = probs.cumsum(-1) if cs is None else cs
                r, n = _vs_recall(probs, cs, chunk, sels[name], s.block_size)
            else:
                B = s.block_size
                if B not in masses:
                    nb = -(-seq // B)
                    masses[B] = torch.nn.functional.pad(probs, (0, nb * B - seq)).view(heads, len(chunk), nb, B).sum(-1)
                r, n = _bw_recall(masses[B], chunk, sels[name], B)
            if s.dense_last:  # rows computed dense: all their mass, all their keys
                exact = (chunk >= seq - s.dense_last)[None, :]
                r, n = torch.where(exact, 1.0, r), torch.where(exact, chunk[None, :] + 1, n)
            res[name] = (r, n)
        yield chunk, res


def _check_one_prompt(q: torch.Tensor, k: torch.Tensor, what: str) -> None:
    if q.dim() != 4 or q.shape[0] != 1 or k.shape[0] != 1:
        raise InputError(f"{what} takes one prompt (batch 1); got q {tuple(q.shape)}, k {tuple(k.shape)}")


def row_recall(q: torch.Tensor, k: torch.Tensor, spec, rows: torch.Tensor, *, scale: float | None = None,
               selections: dict | None = None) -> dict:
    """Recall of a pattern at chosen query ``rows`` only (e.g. a needle's tokens): the selection is the
    runtime's (from the whole prompt), the dense probabilities are computed for those rows alone, so a
    128K prompt costs ``len(rows) x seq``, not ``seq x seq``. q: [1, heads, seq, d]; k: [1, kv_heads,
    seq, d]; rows: positions in [0, seq). ``selections``: name -> a selection made elsewhere (e.g. by another
    estimate), used instead of the runtime's. Returns [heads, len(rows)] in the order of ``rows``; for a
    dict of specs, a dict name -> that."""
    _check_one_prompt(q, k, "row_recall")
    specs = spec if isinstance(spec, dict) else {"": spec}
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    rows = torch.as_tensor(rows, device=q.device).long()
    order = rows.argsort()
    out = {name: torch.empty(q.shape[1], len(rows), device=q.device) for name in specs}
    done = 0
    sels = _selections(q, k, {n: s for n, s in specs.items() if n not in (selections or {})}, scale)
    for chunk, res in _chunks_recall(q, k, specs, sels | (selections or {}), rows[order], scale):
        for name, (r, _) in res.items():
            out[name][:, order[done:done + len(chunk)]] = r
        done += len(chunk)
    return out if isinstance(spec, dict) else out[""]


def layer_recall(q: torch.Tensor, k: torch.Tensor, spec, *, scale: float | None = None) -> dict:
    """Recall of a pattern for one prompt (batch 1). q: [1, heads, seq, d]; k: [1, kv_heads, seq, d]
    (GQA). ``spec``: a DynamicSpec, or a dict name -> DynamicSpec measured in one pass (the dense
    probabilities are computed once). Returns per head (tensors of [heads]): ``mean``, ``p10``,
    ``last_q_mean``, and ``kept``: the share of causal entries the pattern keeps; for a dict, a dict
    name -> that."""
    _check_one_prompt(q, k, "layer_recall")
    specs = spec if isinstance(spec, dict) else {"": spec}
    _, heads, seq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    recall = {name: torch.empty(heads, seq, device=q.device) for name in specs}
    kept = {name: torch.zeros(heads, device=q.device) for name in specs}
    rows = torch.arange(seq, device=q.device)
    for chunk, res in _chunks_recall(q, k, specs, _selections(q, k, specs, scale), rows, scale):
        for name, (r, n) in res.items():
            recall[name][:, chunk] = r
            kept[name] += n.sum(-1).to(torch.float32)
    out = {}
    for name, s in specs.items():
        r, last = recall[name], min(s.last_q, seq)
        out[name] = {"mean": r.mean(-1), "p10": r.quantile(0.1, dim=-1), "last_q_mean": r[:, seq - last:].mean(-1),
                     "kept": kept[name] / (seq * (seq + 1) / 2)}
    return out if isinstance(spec, dict) else out[""]


# -------------------------------------------------------------------------------------- the model pass
def _recall_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function: dense SDPA output, and the recall of every budget on this layer's q / k."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    sink = getattr(module, "_recall_sink", None)
    if sink is not None and query.shape[2] == key.shape[2] > 1:
        if query.shape[0] != 1:
            raise InputError("recall measures one prompt at a time (batch 1)")
        sink["rows"].extend(sink["measure"](module.layer_idx, query, key, scaling))
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


@contextmanager
def measuring(model: torch.nn.Module, budgets: dict[str, DynamicSpec], layers: list[int], measure=None):
    """Route ``layers``' attention through :func:`_recall_attention`; yields the list the rows land in:
    ``(layer, budget name, layer_recall result)`` per layer and budget, or, with ``measure``, whatever
    ``measure(layer, query, key, scaling)`` returns (an iterable) at each layer's prefill (the attention
    output stays dense SDPA)."""
    from .families import attention_modules
    from .patch import routed

    def per_budget(layer, query, key, scaling):
        return [(layer, name, res) for name, res in layer_recall(query, key, budgets, scale=scaling).items()]

    modules = attention_modules(model)
    rows: list = []
    try:
        for idx in layers:
            modules[idx]._recall_sink = {"measure": measure or per_budget, "rows": rows}
        with routed(model, RECALL_ATTN, _recall_attention):
            yield rows
    finally:
        for module in modules.values():
            module.__dict__.pop("_recall_sink", None)


def _parse_layers(text: str | None, num_layers: int) -> list[int]:
    if text is None or text.strip() in ("", "all"):
        return list(range(num_layers))
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.strip().partition("-")
        try:
            lo, hi = int(a), int(b) if b else int(a)
        except ValueError:
            raise InputError(f"layers {text!r}: use e.g. 0-13 or 0,2,4 or all") from None
        if not 0 <= lo <= hi < num_layers:
            raise InputError(f"layers {part!r} outside [0, {num_layers - 1}] for this model")
        out += range(lo, hi + 1)
    return sorted(set(out))


def recall(model: str | None = None, out: Path | str = "recall-out", budgets=("vs:1000/6096",), *,
           config: Path | str | None = None, layers: str | None = None, lengths="4k", tasks="all", samples: int = 1,
           seed: int = 0, chat: bool = True, block_size: int = 128, last_q: int = 64, device: str | None = None,
           dtype: str = "auto", device_map: str | None = None, rope_scaling: str | None = None) -> Path:
    """Measure the recall of each budget on the built-in tasks' prompts; write ``out``/recall.csv
    (layer, head, budget, task, length, sample, mean, p10, last_q_mean, kept), recall_layer.csv
    (averages per layer and budget), recall.png and report.md. ``config``: take the budget and the
    layers from a config's ``dynamic`` spec and its dynamic layers (``budgets`` are added to it).
    ``rope_scaling``: see :mod:`~trimix_probe.rope`."""
    import pandas as pd
    from tqdm.auto import tqdm

    from .config import ModelIdentity, TriMixConfig
    from .models import encode_prompt, load_model
    from .tasks import check_lengths, parse_lengths, parse_tasks, sample_grid

    # everything a user can get wrong is checked before the model loads
    specs = {}
    cfg = TriMixConfig.load(config) if config is not None else None
    if cfg is not None:
        if cfg.dynamic is None:
            raise InputError(f"{config}: the config has no dynamic layers; pass --budget instead")
        for i, kind in enumerate(cfg.layers):   # every budget of the plan (per-layer budgets too)
            if kind == "dynamic":
                specs[budget_name(cfg.dynamic_spec(i))] = cfg.dynamic_spec(i)
    for b in ([budgets] if isinstance(budgets, str) else list(budgets)):
        spec = parse_budget(b, block_size=block_size, last_q=last_q)
        specs[budget_name(spec)] = spec
    if not specs:
        raise InputError("no budget given; use --budget vs:1000/6096 or --budget bw:0.9, or --config")
    length_list, task_list = parse_lengths(lengths), parse_tasks(tasks)
    if not isinstance(samples, int) or samples <= 0:
        raise InputError(f"samples must be a positive count, got {samples!r}")
    check_lengths(length_list, task_list)

    lm, tokenizer, name = load_model(model, device=device, dtype=dtype, device_map=device_map,
                                     rope_scaling=rope_scaling, max_tokens=max(length_list))
    identity = ModelIdentity.from_hf_config(lm.config, name=name)
    if cfg is not None:
        try:
            cfg.check_model(identity)
        except ValueError as err:
            raise InputError(f"{config}: {err}") from None
    if layers is None and cfg is not None:
        layer_list = [i for i, kind in enumerate(cfg.layers) if kind == "dynamic"]
    else:
        layer_list = _parse_layers(layers, identity.num_layers)
    data = sample_grid(tokenizer, length_list, task_list, samples, seed=seed, chat=chat)
    records = []
    t0 = time.perf_counter()
    with measuring(lm, specs, layer_list) as rows, torch.inference_mode():
        for i, s in enumerate(tqdm(data, desc="recall", unit="prompt", file=sys.stderr)):
            ids = encode_prompt(tokenizer, s.prompt, chat=chat, answer_prefix=s.answer_prefix).to(lm.device)
            rows.clear()
            lm(ids, logits_to_keep=1, use_cache=False)
            for layer, budget, res in rows:
                for h in range(res["mean"].shape[0]):
                    records.append({"layer": layer, "head": h, "budget": budget, "task": s.task, "length": s.n_tokens,
                                    "sample": i, **{key: float(v[h]) for key, v in res.items()}})
    seconds = time.perf_counter() - t0
    df = pd.DataFrame(records)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "recall.csv", index=False)
    by_layer = (df.groupby(["budget", "layer"])[["mean", "p10", "last_q_mean", "kept"]].mean().reset_index())
    by_layer.to_csv(out / "recall_layer.csv", index=False)
    meta = {"model": name, "device": str(lm.device), "dtype": str(lm.dtype), "budgets": {k: v.__dict__ for k, v in specs.items()},
            "layers": layer_list, "tasks": task_list, "lengths": length_list, "samples_per_task": samples,
            "seed": seed, "prompts": len(data), "seconds": round(seconds, 1)}
    (out / "recall.json").write_text(json.dumps(meta, indent=2) + "\n")
    _plot(df, out / "recall.png", title=f"{name}: dynamic pattern recall")
    (out / "report.md").write_text(_report(by_layer, df, meta))
    print(f"wrote {out}/ (recall.csv, recall_layer.csv, recall.png, report.md)", file=sys.stderr)
    return out


# ------------------------------------------------------------------------------------------- reporting
def _plot(df, path: Path, title: str) -> Path:
    """Heatmap per budget: layer x head mean recall (fixed 0-1 color scale)."""
    from .plotting import pyplot, save

    plt, sns = pyplot()
    names = sorted(df["budget"].unique())
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 1, 0.22 * df["layer"].nunique() + 1.8),
                             squeeze=False)
    for ax, b in zip(axes[0], names):
        grid = df[df.budget == b].pivot_table(index="layer", columns="head", values="mean", aggfunc="mean")
        sns.heatmap(grid, vmin=0, vmax=1, cmap="viridis", ax=ax, cbar=ax is axes[0][-1],
                    cbar_kws={"label": "mean recall over rows"})
        ax.set_title(b, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return save(fig, path)


def _report(by_layer, df, meta: dict) -> str:
    lines = [f"# Dynamic pattern recall: {meta['model']}", "",
             f"{meta['prompts']} prompts ({', '.join(meta['tasks'])}; lengths {meta['lengths']}; seed {meta['seed']}), "
             f"dense attention, {meta['dtype']} on {meta['device']}, {meta['seconds']} s. Recall: the share of each "
             "query row's dense softmax mass on keys the pattern keeps (1 = nothing lost). `p10`: the 10th "
             "percentile over rows; `last rows`: the rows the vertical-slash estimate is taken from; "
             "`kept`: the share of causal entries the pattern keeps.", "",
             "| budget | mean recall | p10 | last rows | kept | worst layer (mean) | worst head (layer, head: mean) |",
             "|---|---:|---:|---:|---:|---|---|"]
    for b, part in by_layer.groupby("budget"):
        worst = part.sort_values("mean").iloc[0]
        heads = df[df.budget == b].groupby(["layer", "head"])["mean"].mean()
        (wl, wh), wv = heads.idxmin(), heads.min()
        lines.append(f"| {b} | {part['mean'].mean():.3f} | {part['p10'].mean():.3f} | {part['last_q_mean'].mean():.3f} "
                     f"| {part['kept'].mean():.1%} | {int(worst.layer)} ({worst['mean']:.3f}) | {wl}, {wh}: {wv:.3f} |")
    lines += ["", "![recall per layer and head](recall.png)", "", "## Per layer", "",
              "| layer | " + " | ".join(sorted(by_layer.budget.unique())) + " |",
              "|---:|" + "---:|" * by_layer.budget.nunique()]
    grid = by_layer.pivot(index="layer", columns="budget", values="mean")
    for layer, row in grid.iterrows():
        lines.append(f"| {layer} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines) + "\n"
