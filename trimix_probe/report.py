"""The probe's report: figures and one page a person reads first, drawn from a result folder that
:func:`trimix_probe.probe.analyze` wrote (probe.json, importance_layer.csv, importance_head.csv).

Color scales are fixed (shares in [0, 1]) so two reports compare at a glance.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .choice import REPORTED, choose_starting_layer, tail_share
from .errors import InputError
from .plotting import pyplot, save

FIGURES = {"sections": "sections.png", "drop": "middle_drop.png", "heads": "heads_middle.png",
           "verification": "verification.png"}


def _load(out: Path):
    import pandas as pd

    needed = ["probe.json", "importance_layer.csv", "importance_head.csv"]
    missing = [f for f in needed if not (out / f).is_file()]
    if missing:
        raise InputError(f"{str(out)!r} is not a probe result folder (missing {', '.join(missing)}); "
                         "make one with `trimix-probe analyze`")
    return (json.loads((out / "probe.json").read_text()), pd.read_csv(out / "importance_layer.csv"),
            pd.read_csv(out / "importance_head.csv"))


def plot_sections(layer_table, path: Path, title: str) -> Path:
    """Heatmap: layer x section, each layer's share of importance per section."""
    plt, sns = pyplot()
    grid = layer_table.pivot(index="layer", columns="section", values="normalized")[list(REPORTED)]
    fig, ax = plt.subplots(figsize=(6.5, 0.25 * len(grid) + 1.8))
    sns.heatmap(grid, vmin=0, vmax=1, cmap="viridis", annot=len(grid) <= 40, fmt=".2f", annot_kws={"size": 6},
                cbar_kws={"label": "share of the layer's importance"}, ax=ax)
    ax.set(xlabel="section", ylabel="layer")
    ax.set_title(title, fontsize=9)
    return save(fig, path)


def plot_drop(layer_table, path: Path, title: str, starting_layer: int, tau: float,
              gradient_layer: int | None = None) -> Path:
    """Middle importance vs layer (raw, with the tau x peak line; and its share), chosen layer marked
    (and the gradient's own choice, when a verification moved it)."""
    plt, sns = pyplot()
    mid = layer_table[layer_table.section == "middle"].sort_values("layer")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    sns.lineplot(data=mid, x="layer", y="raw", marker="o", ax=top)
    top.axhline(tau * mid.raw.max(), color="gray", ls=":", label=f"tau x peak (tau={tau:g})")
    top.set(ylabel="|d objective / d gate|", title=title)
    sns.lineplot(data=mid, x="layer", y="normalized", marker="o", color="C1", ax=bottom)
    bottom.set(ylabel="middle share", ylim=(0, 1), xlabel="layer")
    for ax in (top, bottom):
        ax.axvline(starting_layer - 0.5, color="C3", ls="--", label=f"starting layer {starting_layer}")
        if gradient_layer is not None and gradient_layer != starting_layer:
            ax.axvline(gradient_layer - 0.5, color="C2", ls="-.", label=f"gradient's layer {gradient_layer}")
    top.legend(fontsize=8)
    return save(fig, path)


def plot_verification(verification: dict, path: Path, title: str) -> Path:
    """Verification curve: per checked starting layer, the answer log-likelihood loss against dense
    (epsilon line; the signed mean drop beside it) and the answers kept (no token lost that dense had
    right); the gradient's and the verified layer marked."""
    import pandas as pd

    from .verify import Bound

    plt, sns = pyplot()
    checks = pd.DataFrame(verification["checks"])
    checks["kept"] = checks.samples - checks.lost
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    sns.lineplot(data=checks, x="layer", y="loss", marker="o", ax=top, label="loss (gains as 0)")
    sns.lineplot(data=checks, x="layer", y="drop", marker=".", ax=top, color="C7", ls=":", label="mean drop")
    top.axhline(verification["epsilon"], color="gray", ls=":", label=f"epsilon = {verification['epsilon']:g}")
    top.set(ylabel="answer log-lik. (nats/token)", title=title)
    sns.lineplot(data=checks, x="layer", y="kept", marker="o", color="C1", ax=bottom)
    allowed = Bound(verification["epsilon"], verification["max_lost"]).allowed(int(checks.samples.max()))
    bottom.axhline(int(checks.samples.max()) - allowed, color="gray", ls=":", label=f"at most {allowed} lost")
    bottom.set(ylabel="answers kept", xlabel="layer", ylim=(-0.5, int(checks.samples.max()) + 0.5))
    for ax in (top, bottom):
        ax.axvline(verification["gradient_layer"] - 0.5, color="C2", ls="-.",
                   label=f"gradient's layer {verification['gradient_layer']}")
        ax.axvline(verification["verified_layer"] - 0.5, color="C3", ls="--",
                   label=f"verified layer {verification['verified_layer']}")
        ax.legend(fontsize=8)
    return save(fig, path)


def _verification_lines(meta: dict) -> tuple[str, str]:
    """(the first sentence of the report, the verification section) when analyze verified its choice."""
    v = meta.get("verification")
    if not v:
        return "", ""
    g, layer, n = v["gradient_layer"], v["verified_layer"], meta["identity"]["num_layers"]
    picked = [c for c in v["checks"] if c["layer"] == layer]
    generated = any("lost_generation" in c for c in v["checks"])  # analyze --check-generation
    lose = "lose a token dense had right" + (" or score below dense's generated answer" if generated else "")
    figures = (f"its answers lose {picked[0]['loss']:.3g} nats per token against dense and "
               f"{picked[0]['lost']} of {picked[0]['samples']} {lose}" if picked else
               "no checked layer stayed within the bound, so no layer runs triangle attention")
    move = "confirmed" if layer == g else f"moved from the gradient's layer {g}"
    how = "a scan of layers" if v.get("search") == "scan" else "a check"
    first = (f"Triangle attention from layer {layer} of {n} ({move} by {how} against dense on "
             f"{v['samples']} other samples): {figures}.\n\n")
    rows = "\n".join(f"| {c['layer']} | {c['loss']:.4f} | {c['drop']:.4f} | {c['max_drop']:.4f} "
                     f"| {c['samples'] - c['lost']}/{c['samples']} | {c['samples'] - c['changed']}/{c['samples']} "
                     f"| {c['seconds']:.1f} |" for c in v["checks"])
    generation = ("" if not generated else ", or whose answer generated greedily as `eval` does (the plan's prefill, "
                  "dense decode) scores below dense's (--check-generation; each sample counted once)")
    work = "forwards and greedy generations" if generated else "forward only"
    section = f"""
## Verification
Each checked starting layer ran the verification samples (seed {v['data']['seed']}, {v['data']['source']})
as at inference: prefill of the prompt with the plan, the answer decoded densely (teacher forced).
Bound: mean answer log-likelihood loss (per-sample drops, gains counted as 0) <= {v['epsilon']:g} nats
per token and at most a share {v['max_lost']:g} of the answers losing a token that dense's greedy choice
had right{generation}.
{v['reason']}.

Cost: verification {meta['verify_seconds']} s (dense reference and {len(v['checks'])} layers, {work})
beside the gradient pass's {meta['probe_seconds']} s. The curve is beside the middle-importance figure above.

| starting layer | loss (nats/token) | mean drop | worst sample | answers kept | greedy answers as dense's | seconds |
|---|---|---|---|---|---|---|
{rows}
"""
    return first, section


def plot_heads(head_table, path: Path, title: str) -> Path:
    """Heatmap: layer x head, each head's share of its importance in the middle section."""
    plt, sns = pyplot()
    grid = head_table[head_table.section == "middle"].pivot(index="layer", columns="head", values="normalized")
    fig, ax = plt.subplots(figsize=(0.35 * grid.shape[1] + 2.5, 0.25 * len(grid) + 1.8))
    sns.heatmap(grid, vmin=0, vmax=1, cmap="magma", cbar_kws={"label": "middle share of the head's importance"}, ax=ax)
    ax.set(xlabel="head", ylabel="layer")
    ax.set_title(title, fontsize=9)
    return save(fig, path)


def _dynamic_section(dyn: dict | None, plan: dict | None = None, heads: dict | None = None) -> str:
    """The report's section on dynamic shallow layers: the budget of each dynamic layer (and the heads
    it keeps dense), per probed length and budget whether the runtime runs it sparse (vertical-slash:
    its worst-case work vs the dense fallback), and the whole plan's verification."""
    if not dyn:
        return ""
    spec = dyn["spec"]
    budget = (f"vertical-slash, {spec['vertical']} vertical columns, {spec['slash']} slash diagonals"
              if spec["method"] == "vertical_slash" else f"blockwise, gamma {spec['gamma']}")
    if spec.get("dense_last"):
        budget += f"; the last {spec['dense_last']} query rows dense"
    lines = ["", "## Dynamic shallow layers", "",
             f"Dynamic-sparse layers below the starting layer (the others stay dense); the most common budget: "
             f"{budget} (block {spec['block_size']}).", ""]
    if dyn.get("work_share"):
        lines += ["| length | budget | worst-case sparse work, share of dense | the runtime runs |",
                  "|---:|---|---:|---|"]
        for length, shares in dyn["work_share"].items():
            notes = dyn["notes"].get(length, {})
            if not isinstance(shares, dict):  # a probe.json of the common budget alone: one figure a length
                shares, notes = {"the most common": shares}, {"the most common": notes} if notes else {}
            runs = {name: "dense (fallback): no speed-up" if name in notes else "sparse" for name in shares}
            lines += [f"| {length} | {name} | {share:.0%} | {runs[name]} |" for name, share in shares.items()]
        lines.append("")
    if dyn.get("layers"):
        lines += ["| layer | budget | heads kept dense |", "|---:|---|---|"]
        lines += [f"| {layer} | {name} | {', '.join(map(str, (heads or {}).get(layer, ()))) or '-'} |"
                  for layer, name in dyn["layers"].items()]
        lines.append("")
    if plan:
        lines.append(f"Whole plan verified against dense: {plan['reason']}.")
    else:
        lines.append("The whole plan was not verified (--no-verify, or budgets pinned without a check): measure "
                     "its answers with `trimix-probe eval` before serving (docs/recall.md, docs/accuracy.md).")
    return "\n".join(lines) + "\n"


def report(dir: Path | str) -> Path:
    """Draw the figures of the result folder ``dir`` and write ``dir/report.md``. Returns its path."""
    out = Path(dir)
    meta, layer_table, head_table = _load(out)
    obj = {"answer": "log-likelihood of the gold answer", "prompt": "next-token log-likelihood inside the prompt"}
    short = f"{meta['model']}, objective {meta['objective']}"
    plot_sections(layer_table, out / FIGURES["sections"], f"{short}: importance share by section")
    plot_drop(layer_table, out / FIGURES["drop"], f"{short}: middle section", meta["starting_layer"], meta["tau"],
              meta.get("gradient_layer"))
    plot_heads(head_table, out / FIGURES["heads"], f"{short}: middle share per head")
    first, verification = _verification_lines(meta)
    if verification:
        plot_verification(meta["verification"], out / FIGURES["verification"], f"{short}: verification")

    data = meta["data"]
    mid = layer_table[layer_table.section == "middle"].sort_values("layer")
    rows = "\n".join(f"| {int(r.layer)} | {r.raw:.3g} | {r.per_entry:.3g} | {r.normalized:.3f} | {r.signed:+.3g} |"
                     for r in mid.itertuples())
    middle = mid.raw.to_numpy()
    taus = sorted({0.05, 0.1, 0.2, 0.3, float(meta["tau"])})
    tau_rows = "\n".join(
        f"| {t:g}{' (this run)' if t == float(meta['tau']) else ''} | {layer} | {tail_share(middle, layer):.1%} |"
        for t in taus for layer in [choose_starting_layer(middle, t)[0]])
    n_tok = [s["prompt_tokens"] for s in meta["samples"]]
    heads = meta["dense_heads"]
    page = f"""# Probe report: {meta['model']}

{first}**Starting layer: {meta['starting_layer']}** of {meta['identity']['num_layers']} (triangle attention from
there on{'; dense heads ' + json.dumps(heads) if heads else ''}).

Reason: {meta['reason']}.

Use it: `trimix-probe run --config {out / 'config.json'} ...` (the config is in the runtime's format).

## Setup
- model: {meta['model']} ({meta['identity']['num_layers']} layers, {meta['identity']['num_heads']} heads /
  {meta['identity']['num_kv_heads']} kv heads), {meta['dtype']}, on {meta['device']}, backend {meta['backend']}
- data: {data['source']}; tasks {', '.join(map(str, data['tasks']))}; lengths {', '.join(map(str, data['lengths']))};
  {len(meta['samples'])} samples (prompt {min(n_tok)}-{max(n_tok)} tokens), seed {data['seed']}, chat template {data['chat']}
- objective: {obj[meta['objective']]} (teacher forcing); sections n_init={meta['n_init']},
  n_local={meta['n_local']}, last_n={meta['last_n']}; tau={meta['tau']:g}
- probe time: {meta['probe_seconds']} s

Importance of a section = d objective / d gate, the gate scaling that section's attention weights
after the softmax (1 = the model as is); -importance is the first-order change of the objective
if the section is dropped. *raw*: mean over samples of |gradient|; *per entry*: divided by the
section's number of (query, key) pairs; *share*: raw / the sum over the four sections.

## Figures
![importance share by layer and section]({FIGURES['sections']})

![middle importance vs layer]({FIGURES['drop']}){verification and f" ![verification curve]({FIGURES['verification']})"}

![middle share per head]({FIGURES['heads']})

## How the choice depends on tau
The starting layer each threshold would give (`--tau`), and the share of the summed middle
importance left in the triangle layers (the plan's first-order cost). A larger tau drops more.
Check a choice with `trimix-probe eval --sweep` before serving: the layer depends on the tasks and
lengths probed (docs/probe.md, docs/accuracy.md).

| tau | starting layer | middle importance in layers >= it |
|---|---|---|
{tau_rows}

## Middle section by layer
| layer | raw | per entry | share | signed mean |
|---|---|---|---|---|
{rows}

Tables: `importance_layer.csv` (layer x section), `importance_head.csv` (layer x head x section).
"""
    page += verification + _dynamic_section(meta.get("dynamic"), meta.get("plan_verification"),
                                            meta.get("dense_heads"))
    path = out / "report.md"
    path.write_text(page)
    print(f"wrote {path}", file=sys.stderr)
    return path
