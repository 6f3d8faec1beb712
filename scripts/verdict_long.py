"""Issue 14's verdict tables at 64K and 128K from the merged eval results of 2026-11-30 (third session):
the tasks where dense scores >= 10 and every method ran 20 samples; each method's average over them,
as a share of dense's, and paired differences (95% bootstrap, stratified by task) to dense and to
TriangleMix alone (the sweep entry whose triangle layers the dynamic config shares: layer 16).
Also the median prefill seconds of the methods that ran whole (batch 1).
With a second folder (the seed-1 runs of 2026-12-01), also the 64K verdict on 40 samples a task.
Usage: python scripts/verdict_long.py docs/raw/eval-qwen-yarn-20-2026-11-30c [docs/raw/eval-qwen-yarn-64k-seed1-2026-12-01]"""

import sys
from pathlib import Path

import pandas as pd

from trimix_probe.evaluate import _frame, changed_samples, paired_delta_ci

root = Path(sys.argv[1])
verdict_parts = {}
for length in ("65472", "130944"):
    df = _frame(pd.read_csv(root / f"merged-{length}" / "results.csv").to_dict("records"))
    n = df.groupby("task")["unit"].nunique()
    dense = df[df.method == "dense"].groupby("task")["score"].mean() * 100
    low = sorted(t for t, v in dense.items() if v < 10)
    short = sorted(t for t, c in n.items() if c < 20)
    keep = [t for t in dense.index if t not in low and t not in short]
    part = verdict_parts[length] = df[df.task.isin(keep)]
    means = part.groupby(["method", "task"])["score"].mean().groupby("method").mean() * 100
    print(f"## {length} tokens: verdict tasks {', '.join(keep)}")
    print(f"left out: dense under 10: {', '.join(low) or 'none'}; fewer than 20 samples: {', '.join(short) or 'none'}\n")
    print("| method | average | % of dense | vs dense (95% CI) | vs trimix@L16 (95% CI) |")
    print("|---|---|---|---|---|")
    for method in dict.fromkeys(df["method"]):
        cells = []
        for ref in ("dense", "trimix@L16"):
            ci = None if method == ref else paired_delta_ci(part, method, against=ref)
            cells.append("-" if ci is None else f"{ci[0] * 100:+.1f} [{ci[1] * 100:+.1f}, {ci[2] * 100:+.1f}]")
        print(f"| {method} | {means[method]:.1f} | {means[method] / means['dense'] * 100:.1f} | {cells[0]} | {cells[1]} |")
    timed = df[pd.to_numeric(df["prefill_s"], errors="coerce").notna()]
    med = timed.groupby("method")["prefill_s"].median()
    print("\nmedian prefill seconds (runs that ran whole, batch 1): "
          + ", ".join(f"{m} {v:.3f}" for m, v in med.items()) + "\n")

# answers lost and gained against dense, per method (verdict tasks): a sample is lost when the
# method scores below dense on it, gained when above; the sweep's average nets the two
print("## samples each method scores below / above dense (verdict tasks)\n")
for length, part in verdict_parts.items():
    cells = [f"{m} {'/'.join(map(str, changed_samples(part, m)))}" for m in dict.fromkeys(part["method"]) if m != "dense"]
    print(f"{length} ({part.groupby(['task', 'unit']).ngroups} samples): " + ", ".join(cells) + "\n")

# 64K, 40 samples a task (2026-12-01): the seed-1 runs of dense, the config and trimix@L22 on the
# six verdict tasks, pooled with the seed-0 rows of the same methods (a sample is task x seed x index)
if len(sys.argv) > 2:
    seed1 = pd.concat([pd.read_csv(p) for p in sorted(Path(sys.argv[2]).glob("*/results.csv"))])
    seed0 = pd.read_csv(root / "merged-65472" / "results.csv")
    tasks = sorted(seed1["task"].unique())
    methods = sorted(seed1["method"].unique())
    print(f"## 65472 tokens, 40 samples a task (seeds 0 and 1): {', '.join(tasks)}\n")
    print("| samples | method | average | % of dense | vs dense (95% CI) | below / above dense |")
    print("|---|---|---|---|---|---|")
    for name, rows in (("seed 0", seed0), ("seed 1", seed1), ("both", pd.concat([seed0, seed1]))):
        df = _frame(rows[rows.task.isin(tasks) & rows.method.isin(methods)].to_dict("records"))
        means = df.groupby(["method", "task"])["score"].mean().groupby("method").mean() * 100
        for method in (m for m in methods if m != "dense"):
            d, lo, hi = paired_delta_ci(df, method)
            below, above = changed_samples(df, method)
            print(f"| {name} | {method} | {means[method]:.1f} | {means[method] / means['dense'] * 100:.1f} | "
                  f"{d * 100:+.1f} [{lo * 100:+.1f}, {hi * 100:+.1f}] | {below} / {above} |")
    timed = seed1.pivot_table(index=["task", "sample"], columns="method", values="prefill_s")
    print(f"\nseed 1, {len(timed)} prompts: median prefill dense {timed['dense'].median():.3f} s, config "
          f"{timed['config'].median():.3f} s; median of the per-prompt ratio config / dense "
          f"{(timed['config'] / timed['dense']).median():.3f}")
