"""Figures of finished runs: stacked gap bars per model and family, per-datapoint gap distributions.

Every figure is written as PNG and PDF, in one seaborn style, with axes in nats. The numbers come
from each run's ``datapoints.csv`` (datapoints with numerical faults left out, as in the summary).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .tables import FAMILY_LABELS, FAMILY_ORDER

NO_FAULT = "ok"


def use_style() -> None:
    """The one style of gapbench's figures (matplotlib without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper", palette="colorblind")


def save(fig, stem: str | Path) -> list[Path]:
    """Write ``stem``.png (200 dpi) and ``stem``.pdf; returns both paths."""
    import matplotlib.pyplot as plt

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=200, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def read_datapoints(run_dir: str | Path) -> pd.DataFrame:
    """A run's datapoints.csv without the faulty datapoints."""
    frame = pd.read_csv(Path(run_dir) / "datapoints.csv")
    return frame[frame["fault"] == NO_FAULT] if "fault" in frame else frame


def refined_families(frame: pd.DataFrame) -> list[str]:
    return [f for f in FAMILY_ORDER if f"elbo_q_star_{f}" in frame]


def family_gaps(frame: pd.DataFrame) -> pd.DataFrame:
    """Per datapoint and refined family f: approximation = log p̂(x) − L[q*_f], amortization =
    L[q*_f] − L[q]; long form (family, gap, value)."""
    parts = []
    for f in refined_families(frame):
        star = frame[f"elbo_q_star_{f}"]
        parts.append(pd.DataFrame({"family": f, "gap": "approximation", "value": frame["log_px"] - star}))
        parts.append(pd.DataFrame({"family": f, "gap": "amortization", "value": star - frame["elbo_q"]}))
    return pd.concat(parts, ignore_index=True)


def gap_bars(frames: Sequence[pd.DataFrame], labels: Sequence[str], stem: str | Path) -> list[Path]:
    """One group of bars per model, one bar per refined family: the approximation gap (bottom) and
    the amortization gap (top) stacked to the inference gap, with ±1 standard error over datapoints."""
    use_style()
    import matplotlib.pyplot as plt
    import seaborn as sns

    colors = sns.color_palette("colorblind", 2)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(frames), 3.2))
    x, ticks, ticklabels = 0.0, [], []
    for frame, label in zip(frames, labels):
        gaps = family_gaps(frame)
        for f in refined_families(frame):
            approx = gaps[(gaps.family == f) & (gaps.gap == "approximation")]["value"].to_numpy()
            amort = gaps[(gaps.family == f) & (gaps.gap == "amortization")]["value"].to_numpy()
            se = lambda v: v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0  # noqa: E731
            ax.bar(x, approx.mean(), 0.8, color=colors[0], yerr=se(approx), capsize=3,
                   label="approximation" if x == 0 else None)
            ax.bar(x, amort.mean(), 0.8, bottom=approx.mean(), color=colors[1], yerr=se(amort), capsize=3,
                   label="amortization" if x == 0 else None)
            ticks.append(x)
            ticklabels.append(f"{label}\nq*: {FAMILY_LABELS.get(f, f)}")
            x += 1.0
        x += 0.6
    ax.set_xticks(ticks, ticklabels)
    ax.set_ylabel("gap (nats)")
    ax.set_title("Inference gap = approximation + amortization")
    ax.legend(frameon=False)
    return save(fig, stem)


def gap_distributions(frames: Sequence[pd.DataFrame], labels: Sequence[str], stem: str | Path) -> list[Path]:
    """Per-datapoint approximation and amortization gaps of each model's own family (the columns
    ``approximation`` and ``amortization`` of datapoints.csv), as box plots over datapoints."""
    use_style()
    import matplotlib.pyplot as plt
    import seaborn as sns

    long = pd.concat([pd.DataFrame({"model": label, "gap": gap, "value": frame[gap]})
                      for frame, label in zip(frames, labels) for gap in ("approximation", "amortization")],
                     ignore_index=True)
    fig, ax = plt.subplots(figsize=(2.2 + 1.4 * len(frames), 3.2))
    sns.boxplot(data=long, x="model", y="value", hue="gap", ax=ax, fliersize=1.5)
    ax.set_xlabel("")
    ax.set_ylabel("per-datapoint gap (nats)")
    ax.set_title("Gaps per datapoint")
    ax.legend(frameon=False, title=None)
    return save(fig, stem)
