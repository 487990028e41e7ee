"""Figure: refinement curves of one or more runs, the mean ELBO and the fraction of the amortization
gap closed against the number of SVI steps from the encoder's output.

    gapbench figure curve RUN_DIR [RUN_DIR ...] --out FILE.png

Reads ``summary.json["curve"]`` of each run (a run made with ``curve.enabled = true``) and writes
FILE.png and FILE.pdf. Left: mean ELBO over datapoints (nats) with, dashed, the mean L[q*] of local
refinement to convergence; error bars are the standard errors over datapoints of the mean gain
L_k - L_0 (the same datapoints and the same evaluation noise at every k, so the spread of the ELBO
over datapoints cancels). Right: the fraction of the amortization gap closed,
mean(L_k - L_0) / mean(L[q*] - L_0), with its delta-method standard error.
"""

from __future__ import annotations

import json
from pathlib import Path

from gapbench.errors import GapbenchError
from gapbench.report.figures.common import save, use_style


class FigureError(GapbenchError, ValueError):
    """A run folder the figure cannot be drawn from; the message says why and what to do."""


def read_curve(run_dir: str | Path) -> tuple[str, dict]:
    """(label, summary["curve"]) of a run folder; the label is the run's name."""
    file = Path(run_dir) / "summary.json"
    if not file.is_file():
        raise FigureError(f"{file} does not exist; pass a finished run folder")
    try:
        summary = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise FigureError(f"{file} is not readable JSON ({error}); rerun the run to rewrite it") from None
    curve = summary.get("curve") if isinstance(summary, dict) else None
    if not isinstance(curve, dict) or "mean_elbo" not in curve:
        raise FigureError(f"{run_dir} has no refinement curve; add one with `gapbench run {Path(run_dir) / 'config.json'} "
                          f"--out {run_dir} --set curve.enabled=true --force` (--force redoes only the curve and "
                          "report stages and keeps the others)")
    settings = summary.get("settings", {})
    label = str(settings.get("name", Path(run_dir).name))
    train = settings.get("train") or {}
    if train.get("semi_amortized_steps"):
        label += f" (semi-amortized, K = {train['semi_amortized_steps']}, {train.get('semi_amortized_gradient')})"
    return label, curve


def plot(curves: list[tuple[str, dict]], out: str | Path) -> list[Path]:
    """Draw the curves (gapbench's figure style, ``report.figures``); returns the PNG and PDF paths written."""
    use_style()
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import ScalarFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for (label, curve), color in zip(curves, sns.color_palette("colorblind", len(curves))):
        steps = curve["steps"]
        left.errorbar(steps, curve["mean_elbo"], yerr=curve["mean_gain_stderr"], marker="o", ms=4, capsize=3,
                      color=color, label=f"{label}: L after k steps")
        if "mean_elbo_q_star" in curve:
            left.axhline(curve["mean_elbo_q_star"], color=color, ls="--", lw=1, label=f"{label}: L[q*]")
            right.errorbar(steps, curve["fraction_closed"], yerr=curve["fraction_closed_stderr"], marker="o",
                           ms=4, capsize=3, color=color, label=label)
    for axis in (left, right):
        axis.set_xscale("symlog", linthresh=1.0)
        axis.set_xlim(left=0)
        axis.xaxis.set_major_formatter(ScalarFormatter())
        axis.set_xlabel("SVI steps k from the encoder's output")
    left.set_ylabel("mean ELBO (nats)")
    left.set_title("ELBO along the refinement")
    left.legend(fontsize=7, loc="lower right")
    right.axhline(1.0, color="black", lw=1)
    right.set_ylabel("fraction of the amortization gap closed")
    right.set_title("(L_k - L[q]) / (L[q*] - L[q]), ratio of means")
    right.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, Path(out))  # FILE.png and FILE.pdf

