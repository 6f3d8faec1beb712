"""Headless plotting: pyplot and seaborn on the Agg backend, imported only when a figure is drawn,
and one way to write a figure. The probe report, the accuracy report and the recall report share these."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """(matplotlib.pyplot, seaborn) on the headless Agg backend; imported here, not at module load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    return plt, sns


def save(fig, path: Path, dpi: int = 130) -> Path:
    """Lay out, write and close ``fig`` (a matplotlib Figure or a seaborn FacetGrid, which saves with a
    tight bounding box so its outside legend stays in)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(getattr(fig, "figure", fig))
    return path
