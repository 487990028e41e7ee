"""Figures of finished runs: stacked gap bars per model and family, per-datapoint gap distributions,
and the per-datapoint approximation gap against the amortization gap with their marginals.

Every figure is written as PNG and PDF, in one seaborn style, with axes in nats, and titled with the
dataset, the run and N, and what its bars, boxes and whiskers are. The numbers come from each run's
``datapoints.csv`` (datapoints with numerical faults left out, as in the summary).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from gapbench.report.tables import FAMILY_LABELS, FAMILY_ORDER

NO_FAULT = "ok"


def use_style() -> None:
    """The one style of gapbench's figures (matplotlib without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper", palette="colorblind")


def save(fig, stem: str | Path) -> list[Path]:
    """Write ``stem``.png (200 dpi) and ``stem``.pdf, each atomically; returns both paths."""
    import matplotlib.pyplot as plt

    from gapbench.io import _atomic_path

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    for tmp in stem.parent.glob(f".{stem.name}.*.tmp"):  # left by a process killed mid-write
        tmp.unlink(missing_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path, options in zip(paths, ({"format": "png", "dpi": 200}, {"format": "pdf"})):
        with _atomic_path(path) as tmp:  # whole or absent under its own name
            fig.savefig(tmp, bbox_inches="tight", **options)
    plt.close(fig)
    return paths


def describe(frames: Sequence[pd.DataFrame], summaries: Sequence[dict]) -> str:
    """The runs a figure shows: "digits, run digits, N = 1000" (N: datapoints without faults)."""
    settings = [s.get("settings", {}) for s in summaries]
    datasets = ", ".join(dict.fromkeys(str(s.get("dataset", "?")) for s in settings))
    runs = ", ".join(str(s.get("name", "?")) for s in settings)
    counts = [len(f) for f in frames]
    n = f"N = {counts[0]}" + (" each" if len(counts) > 1 else "") if len(set(counts)) == 1 \
        else "N = " + ", ".join(map(str, counts))
    return f"{datasets}, run{'s' if len(settings) > 1 else ''} {runs}, {n}".replace("N = ", "N\u00a0=\u00a0")


def set_title(ax, fig, lines: Sequence[str]) -> None:
    """A title of several lines, each wrapped to the width of the figure."""
    width = max(24, int(fig.get_figwidth() * 14))  # characters per line at the paper context's title size
    ax.set_title("\n".join(textwrap.fill(line, width) for line in lines if line), fontsize="medium")


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


def gap_bars(frames: Sequence[pd.DataFrame], labels: Sequence[str], stem: str | Path, *,
             title: str = "") -> list[Path]:
    """One group of bars per model, one bar per refined family: the mean approximation gap (bottom)
    and the mean amortization gap (top) stacked to the inference gap, whiskers ±2 standard errors over
    datapoints. ``title``: the runs shown (:func:`describe`)."""
    use_style()
    import matplotlib.pyplot as plt
    import seaborn as sns

    colors = sns.color_palette("colorblind", 2)
    fig, ax = plt.subplots(figsize=(max(3.6, 1.8 + 1.6 * len(frames)), 3.2))
    x, ticks, ticklabels = 0.0, [], []
    for frame, label in zip(frames, labels):
        gaps = family_gaps(frame)
        for f in refined_families(frame):
            approx = gaps[(gaps.family == f) & (gaps.gap == "approximation")]["value"].to_numpy()
            amort = gaps[(gaps.family == f) & (gaps.gap == "amortization")]["value"].to_numpy()
            se = lambda v: v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0  # noqa: E731
            ax.bar(x, approx.mean(), 0.8, color=colors[0], yerr=2 * se(approx), capsize=3,
                   label="approximation" if x == 0 else None)
            ax.bar(x, amort.mean(), 0.8, bottom=approx.mean(), color=colors[1], yerr=2 * se(amort), capsize=3,
                   label="amortization" if x == 0 else None)
            ticks.append(x)
            ticklabels.append(f"{label}\nq*: {FAMILY_LABELS.get(f, f)}")
            x += 1.0
        x += 0.6
    ax.set_xticks(ticks, ticklabels)
    ax.set_ylabel("gap (nats)")
    set_title(ax, fig, ["Inference gap = approximation + amortization", title,
                        "bars: mean; whiskers: ±2 stderr over datapoints"])
    ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    return save(fig, stem)


def gap_distributions(frames: Sequence[pd.DataFrame], labels: Sequence[str], stem: str | Path, *,
                      title: str = "") -> list[Path]:
    """Per-datapoint approximation and amortization gaps of each model's own family (the columns
    ``approximation`` and ``amortization`` of datapoints.csv), as box plots over datapoints.
    ``title``: the runs shown (:func:`describe`)."""
    use_style()
    import matplotlib.pyplot as plt
    import seaborn as sns

    long = pd.concat([pd.DataFrame({"model": label, "gap": gap, "value": frame[gap]})
                      for frame, label in zip(frames, labels) for gap in ("approximation", "amortization")],
                     ignore_index=True)
    fig, ax = plt.subplots(figsize=(max(3.6, 2.2 + 1.4 * len(frames)), 3.2))
    sns.boxplot(data=long, x="model", y="value", hue="gap", ax=ax, fliersize=1.5)
    ax.set_xlabel("")
    ax.set_ylabel("per-datapoint gap (nats)")
    set_title(ax, fig, ["Gaps per datapoint", title, "boxes: quartiles; whiskers: 1.5 IQR; dots: beyond"])
    ax.legend(frameon=False, title=None)
    return save(fig, stem)


def gap_scatter(frames: Sequence[pd.DataFrame], labels: Sequence[str], stem: str | Path, *,
                title: str = "") -> list[Path]:
    """Per datapoint, the approximation gap (x) against the amortization gap (y) of each model's own
    family, with the marginal histograms (seaborn's jointplot): what the means of the table hide, such
    as a few datapoints carrying most of a gap, or the two gaps trading off. ``title``: :func:`describe`."""
    use_style()
    import seaborn as sns

    long = pd.concat([pd.DataFrame({"model": label, "approximation": frame["approximation"],
                                    "amortization": frame["amortization"]})
                      for frame, label in zip(frames, labels)], ignore_index=True)
    grid = sns.jointplot(data=long, x="approximation", y="amortization", hue="model" if len(frames) > 1 else None,
                         kind="scatter", height=4.2, s=8, alpha=0.5, marginal_kws={"fill": True} if len(frames) > 1
                         else {"bins": 40})
    grid.set_axis_labels("approximation gap (nats)", "amortization gap (nats)")
    width = grid.figure.get_figwidth()
    lines = ["Approximation against amortization gap", title, "dots: datapoints; margins: histograms"]
    grid.figure.suptitle("\n".join(textwrap.fill(line, max(24, int(width * 14))) for line in lines if line),
                         fontsize="medium")
    grid.figure.tight_layout()
    return save(grid.figure, stem)


FIGURES = {"gap_bars": gap_bars, "gap_distributions": gap_distributions, "gap_scatter": gap_scatter}


def run_figures(frames: Sequence[pd.DataFrame], summaries: Sequence[dict], labels: Sequence[str],
                out: str | Path) -> list[Path]:
    """Every figure of :data:`FIGURES` for these runs, as ``out``/NAME.png and .pdf."""
    title = describe(frames, summaries)
    return [path for name, figure in FIGURES.items() for path in figure(frames, labels, Path(out) / name, title=title)]


def write_run_figures(run_dir: str | Path, frame: pd.DataFrame, summary: dict) -> list[Path]:
    """The figures of one run into ``run_dir``/figures, from its datapoints frame (faults left out)
    and summary: what the report stage of ``gapbench run`` writes."""
    from gapbench.report.tables import column_labels

    usable = frame[frame["fault"] == NO_FAULT] if "fault" in frame else frame
    return run_figures([usable], [summary], column_labels([summary]), Path(run_dir) / "figures")
