"""The choice rule: importance tables from the probe's gate gradients, the starting layer of
triangle attention, the per-head plan, and the budgets of dynamic shallow layers. Pure functions
of arrays (numpy, pandas); the probe (:mod:`trimix_probe.probe`) and the report
(:mod:`trimix_probe.report`) share them."""

from __future__ import annotations

import math

import numpy as np
import torch

from .config import DynamicMethod, DynamicSpec
from .errors import InputError
from .reference import Section

SECTIONS: tuple[str, ...] = tuple(s.name for s in Section)  # gate order: init, local, last, middle
REPORTED: tuple[str, ...] = SECTIONS + ("local+last",)


def importance_tables(grads: torch.Tensor, sizes: torch.Tensor):
    """Long tables (pandas) from per-sample gate gradients ``grads`` [samples, layers, heads, 4] and
    section sizes ``sizes`` [samples, 4]. Per (layer[, head], section): ``raw`` = mean over samples of
    |d objective / d gate|; ``per_entry`` = the same divided by the gate's number of (q, k) pairs
    (the TriangleMix authors' measure); ``normalized`` = raw / the sum of the four sections' raw
    (share in [0, 1]); ``signed`` = mean of the signed gradient (> 0: the section helps the
    objective). A layer's values are those of one gate shared by its heads (the sum of their
    gradients); ``local+last`` is one gate over both sections."""
    import pandas as pd

    heads = grads.shape[2]

    def with_sum(g, n):  # append local+last
        return (torch.cat([g, g[..., 1:3].sum(-1, keepdim=True)], -1),
                torch.cat([n, n[..., 1:3].sum(-1, keepdim=True)], -1))

    def rows(g, n, keys):  # g: [samples, ..., 5], n: broadcastable entries
        raw = g.abs().mean(0)
        out = {"raw": raw, "per_entry": (g.abs() / n).mean(0),
               "normalized": raw / raw[..., :4].sum(-1, keepdim=True).clamp(min=1e-300), "signed": g.mean(0)}
        table = []
        for idx in np.ndindex(*raw.shape):
            table.append(dict(zip(keys, idx[:-1])) | {"section": REPORTED[idx[-1]]}
                         | {k: float(v[idx]) for k, v in out.items()})
        return pd.DataFrame(table)

    g_layer, n_layer = with_sum(grads.sum(2), sizes[:, None, :] * heads)
    g_head, n_head = with_sum(grads, sizes[:, None, None, :])
    return rows(g_layer, n_layer, ["layer"]), rows(g_head, n_head, ["layer", "head"])


def choose_starting_layer(middle, tau: float = 0.1) -> tuple[int, str]:
    """The starting layer: the first layer ``L`` from which the middle importance stays at or under
    ``tau`` times its peak, ``L = min{L : m_l <= tau * max(m) for every l >= L}``.

    ``m_l`` is the first-order change of the objective when layer ``l`` drops its middle section,
    so layers from ``L`` on each cost at most ``tau`` of the worst layer. Default ``tau = 0.1``: an
    order of magnitude under the peak, a heuristic (the authors chose by hand); the reason string
    also gives the share of all middle importance held by layers >= L, the first-order cost of the
    whole plan. ``L = len(m)`` means no layer is safe; all zeros gives 0."""
    if not 0 <= tau <= 1:
        raise InputError(f"tau must be in [0, 1], got {tau!r}")
    m = np.abs(np.asarray(middle, dtype=float))
    peak = float(m.max()) if m.size else 0.0
    if peak == 0:
        return 0, "the middle section has no importance in any layer"
    above = np.nonzero(m > tau * peak)[0]
    start = int(above[-1]) + 1 if above.size else 0
    return start, (f"middle importance stays <= tau={tau:g} x its peak (layer {int(m.argmax())}, {peak:.3g}) "
                   f"from layer {start} on; layers >= {start} hold {tail_share(m, start):.1%} of the total "
                   "middle importance")


def tail_share(middle, start: int) -> float:
    """The share of the summed |middle importance| held by layers >= ``start``: the first-order cost
    of dropping the middle from ``start`` on, relative to dropping it everywhere (0 without any)."""
    m = np.abs(np.asarray(middle, dtype=float))
    total = m.sum()
    return float(m[start:].sum() / total) if total else 0.0


def dense_heads_plan(head_middle, starting_layer: int, tau: float = 0.1) -> dict[int, tuple[int, ...]]:
    """Per-head plan: in the triangle layers (>= ``starting_layer``), heads whose middle importance
    ``head_middle`` [layers, heads] is above ``tau`` times its peak over all layers and heads stay dense."""
    m = np.abs(np.asarray(head_middle, dtype=float))
    limit = tau * m.max()
    plan = {layer: tuple(int(h) for h in np.nonzero(m[layer] > limit)[0]) for layer in range(starting_layer, len(m))}
    return {layer: heads for layer, heads in plan.items() if heads}


# ------------------------------------------------------------------------------------ dynamic budgets
# Rungs of the vertical-slash ladder: (vertical, slash) as shares of the prompt length N. The kernel's
# worst-case work is about 2 (2 slash + vertical) / N of dense causal attention: 3.5%, 7%, 14%, 28%, 42%
# (MInference's 1000/6096 at 128K, the budget issue 24 saw lose answers, lies between rungs 3 and 4).
VS_LADDER = ((1 / 512, 1 / 128), (1 / 256, 1 / 64), (1 / 128, 1 / 32), (1 / 64, 1 / 16), (3 / 128, 3 / 32))
GAMMA_LADDER = (0.9, 0.95, 0.98, 0.99, 0.995)  # blockwise: attention mass kept per query block (more: more work)
RECALL_TARGET = 0.95  # worst head's mean recall a layer of ordinary middle importance must keep


def budget_ladder(method: DynamicMethod, seq: int, *, dense_last: int = 0, block_size: int = 128,
                  last_q: int = 64) -> tuple[DynamicSpec, ...]:
    """The budgets a dynamic layer can take at ``seq`` tokens, smallest first: vertical-slash rungs
    scaled to ``seq`` (:data:`VS_LADDER`; slash rounded up to whole bands of ``block_size``), or the
    blockwise gammas (:data:`GAMMA_LADDER`). Vertical-slash rungs whose worst-case work passes the
    runtime's dense fallback are left out: they would run dense anyway (the rung above the ladder is
    dense). Repeats (short prompts) are dropped."""
    from .dynamic import dense_above_limit, work_share

    common = dict(method=method, block_size=block_size, last_q=last_q, dense_last=dense_last)
    if method == "blockwise":
        return tuple(DynamicSpec(gamma=g, **common) for g in GAMMA_LADDER)
    out: list[DynamicSpec] = []
    for fv, fs in VS_LADDER:
        slash = block_size * max(1, math.ceil(fs * seq / block_size))  # whole bands
        spec = DynamicSpec(vertical=max(1, round(fv * seq)), slash=slash, **common)
        if work_share(spec, seq) <= dense_above_limit() and spec not in out:
            out.append(spec)
    return tuple(out)


def required_recall(middle: float, peak: float, target: float = RECALL_TARGET, tau: float = 0.1) -> float:
    """The recall a shallow layer of middle importance ``middle`` must keep: ``target`` for a layer at
    or under ``tau x peak`` (the bar of the starting layer), and above it the lost mass allowed shrinks
    in proportion, so that every layer's first-order cost ``middle x (1 - recall)`` stays under
    ``(1 - target) x tau x peak``."""
    if not 0 < target <= 1:
        raise InputError(f"recall target must be in (0, 1], got {target!r}")
    bar = tau * peak
    return 1 - (1 - target) * (min(1.0, bar / middle) if middle > bar and middle > 0 else 1.0)


def choose_budgets(recall, middle, peak: float, target: float = RECALL_TARGET, tau: float = 0.1,
                   shares=None, limit: float = 1.0):
    """Per shallow layer, a rung of the ladder and the heads that stay dense in it.

    ``recall`` [layers, rungs, heads]: each head's mean recall of each rung (or [layers, rungs]: one
    figure a layer, no dense heads); ``middle`` [layers]: the layers' middle importance; ``peak``:
    its peak over all layers; ``shares`` [rungs] or [layers, rungs]: each rung's work over dense
    causal attention (None: the ladder's order). A head whose recall at a rung misses the layer's
    :func:`required_recall` stays dense at that rung; the layer takes the rung of least cost, its
    share plus the share of dense heads (ties: the higher rung), and stays dense (None) when that
    cost passes ``limit`` (a sparse layer would cost about as much as dense). Returns (rungs,
    required recall, dense heads) by layer index."""
    r = np.asarray(recall, dtype=float)
    if r.ndim == 2:
        r = r[..., None]
    m = np.abs(np.asarray(middle, dtype=float))
    n_rungs, n_heads = r.shape[1], r.shape[2]
    share = np.broadcast_to(np.zeros(n_rungs) if shares is None else np.asarray(shares, dtype=float), (len(m), n_rungs))
    steps, need, heads = {}, {}, {}
    for layer in range(len(m)):
        need[layer] = required_recall(float(m[layer]), peak, target, tau)
        if r.shape[2] == 1 and shares is None:   # one figure a layer: the lowest rung that reaches it
            ok = np.nonzero(r[layer, :, 0] >= need[layer] - 1e-12)[0]
            steps[layer], heads[layer] = (int(ok[0]) if ok.size else None), ()
            continue
        best = None
        for rung in range(n_rungs):
            dense = tuple(int(h) for h in np.nonzero(r[layer, rung] < need[layer] - 1e-12)[0])
            cost = share[layer, rung] + len(dense) / n_heads
            if len(dense) < n_heads and (best is None or cost <= best[0] + 1e-12):
                best = (cost, rung, dense)
        if best is None or best[0] > limit:
            steps[layer], heads[layer] = None, ()
        else:
            steps[layer], heads[layer] = best[1], best[2]
    return steps, need, heads


def sparse_recall(recall, heads: dict[int, tuple[int, ...]]):
    """[layers, rungs]: the worst recall over the heads of each layer that run sparse (1 where every
    head is dense); ``recall`` [layers, rungs, heads], ``heads`` the dense heads by layer index."""
    r = np.asarray(recall, dtype=float)
    out = np.ones(r.shape[:2])
    for layer in range(r.shape[0]):
        keep = [h for h in range(r.shape[2]) if h not in set(heads.get(layer, ()))]
        if keep:
            out[layer] = r[layer][:, keep].min(-1)
    return out


def raise_budgets(steps: dict[int, int | None], failures: int, rungs: dict[int, int], cost, recall=None,
                  need: dict[int, float] | None = None) -> dict[int, int | None]:
    """The shallow rungs after the whole plan failed its check ``failures`` times (rungs only go up;
    past a layer's top rung, ``rungs[layer]``, it is dense). With measured ``recall`` [layer][rung]:
    the lost mass each layer is allowed halves per failure, ``1 - (1 - need) / 2^failures``, and each
    layer takes the lowest rung reaching it (dense when none does); if that raises nothing, the
    costliest sparse layer (``cost(layer, rung)``) goes up one rung. Without recall (a pinned budget):
    the costliest half of the sparse layers (at least one) goes up one rung."""
    sparse = sorted((layer for layer, s in steps.items() if s is not None),
                    key=lambda layer: (-cost(layer, steps[layer]), layer))  # costliest first
    out = dict(steps)

    def up(layer: int) -> None:
        out[layer] = steps[layer] + 1 if steps[layer] + 1 < rungs[layer] else None
    if recall is None:
        for layer in sparse[:max(1, len(sparse) // 2)]:
            up(layer)
        return out
    for layer in sparse:
        req = 1 - (1 - need[layer]) / 2 ** failures
        ok = [r for r in range(steps[layer], rungs[layer]) if recall[layer][r] >= req - 1e-12]
        out[layer] = ok[0] if ok else None
    if out == steps and sparse:
        up(sparse[0])
    return out
