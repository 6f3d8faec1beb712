"""The choice rule: importance tables from the probe's gate gradients, the starting layer of
triangle attention, and the per-head plan. Pure functions of arrays (numpy, pandas); the probe
(:mod:`trimix_probe.probe`) and the report (:mod:`trimix_probe.report`) share them."""

from __future__ import annotations

import numpy as np
import torch

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
