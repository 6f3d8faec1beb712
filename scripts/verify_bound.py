"""Which layer would `analyze --verify` emit, for a given bound, on the recorded curves?

The curves are `analyze --verify-layers all` runs (docs/raw/verify-curves-h200-2026-11-30/*/probe.json):
every starting layer checked on the same verification samples, with the per-sample figures. A check
is a deterministic forward, so the search's choice for any bound, any subset of those samples and
any gradient layer follows from these figures exactly, through verify.py's own `search_layer` and
`scan_layers` (nothing re-implemented here). Prints one row per bound: the bisection's choice (the
default search, `--max-checks` layers) and the scan's, at each grid point, next to the eval sweep's
lowest layer keeping >= 99% of dense (docs/accuracy.md).

    python scripts/verify_bound.py                      # the grid behind the defaults (docs/probe.md)
    python scripts/verify_bound.py --per-task 1         # what 1 verification sample a task would pick
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trimix_probe.verify import Bound, LayerCheck, scan_layers, search_layer

CURVES = Path(__file__).resolve().parent.parent / "docs/raw/verify-curves-h200-2026-11-30"
# the eval sweep's lowest starting layer keeping >= 99% of dense (docs/accuracy.md), per grid point
SWEEP = {"smol-4k": 12, "smol-8128": 12, "qwen-8k": 12, "qwen-16k": 18, "qwen-32k": 16}
# the gradient's layer of the default analyze (1 sample a task) where it differs from the curve run's
GRADIENT = {"smol-2k": 22}


def checks(name: str, per_task: int) -> tuple[dict[int, LayerCheck], int]:
    meta = json.loads((CURVES / name / "probe.json").read_text())
    v = meta["verification"]
    seen: dict[str, int] = {}
    keep = []
    for i, task in enumerate(v["data"]["tasks"]):  # the first `per_task` samples of each task
        seen[task] = seen.get(task, 0) + 1
        if seen[task] <= per_task:
            keep.append(i)
    out = {}
    for c in v["checks"]:
        drops = [c["drops"][i] for i in keep]
        same = [c["same"][i] for i in keep]
        out[c["layer"]] = LayerCheck(layer=c["layer"], drop=sum(drops) / len(drops), changed=same.count(False),
                                     samples=len(keep), max_drop=max(drops), seconds=0.0, drops=tuple(drops),
                                     same=tuple(same), lost_flags=tuple(c["lost_flags"][i] for i in keep))
    return out, GRADIENT.get(name, v["gradient_layer"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epsilon", default="0.01,0.015,0.02,0.03")
    ap.add_argument("--max-lost", default="0.125")
    ap.add_argument("--per-task", type=int, default=2, help="verification samples a task (the first N recorded)")
    ap.add_argument("--max-checks", type=int, default=4)
    args = ap.parse_args()
    names = sorted(p.name for p in CURVES.iterdir() if (p / "probe.json").is_file())
    print(f"bisect / scan choice per grid point ({args.per_task} sample(s) a task, {args.max_checks} checks); "
          "sweep = the eval's lowest layer keeping >= 99% of dense")
    print("| epsilon | max_lost | " + " | ".join(f"{n} (sweep {SWEEP.get(n, '-')})" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for eps in map(float, args.epsilon.split(",")):
        for share in map(float, args.max_lost.split(",")):
            bound, cells = Bound(eps, share), []
            for name in names:
                by, gradient = checks(name, args.per_task)
                top = max(by) + 1
                bis = search_layer(lambda layer: by[layer], gradient, top, bound, args.max_checks).verified_layer
                scan = scan_layers(lambda layer: by[layer], sorted(by), gradient, top, bound).verified_layer
                cells.append(f"{bis} / {scan}")
            print(f"| {eps:g} | {share:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
