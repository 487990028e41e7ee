"""The figure of `gapbench track`: bounds and gaps against training epochs, training datapoints
(solid) beside validation datapoints (dashed)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from gapbench.report.figures.common import save, use_style

BOUNDS = (("log_px", "log p̂(x)"), ("elbo_q_star", "L[q*]"), ("elbo_q", "L[q]"))
GAPS = (("approximation", "approximation gap"), ("amortization", "amortization gap"))


def track_figure(frame: pd.DataFrame, stem: str | Path) -> list[Path]:
    """``frame``: track.csv (epoch, split, quantity, mean, stderr)."""
    use_style()
    import matplotlib.pyplot as plt
    import seaborn as sns

    colors = dict(zip([q for q, _ in BOUNDS + GAPS], sns.color_palette("colorblind", len(BOUNDS) + len(GAPS))))
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.4))
    for ax, quantities in ((left, BOUNDS), (right, GAPS)):
        for quantity, label in quantities:
            for split, style in (("train", "-"), ("valid", "--")):
                part = frame[(frame.quantity == quantity) & (frame.split == split)].sort_values("epoch")
                ax.errorbar(part["epoch"], part["mean"], yerr=part["stderr"], linestyle=style, marker="o",
                            markersize=3, capsize=2, color=colors[quantity], label=f"{label}, {split}")
        ax.set_xlabel("epoch")
        ax.legend(frameon=False, fontsize=7)
    left.set_ylabel("bound (nats)")
    right.set_ylabel("gap (nats)")
    left.set_title("Bounds on training and validation datapoints")
    right.set_title("Gaps: training (solid) vs validation (dashed)")
    fig.tight_layout()
    return save(fig, stem)
