"""Gap tables from run summaries: one run's table, and the cross-family table of Cremer, Li &
Duvenaud (2018, Table 2) in Markdown, CSV and LaTeX."""

from __future__ import annotations

import csv
import io
import math
from typing import Sequence

from gapbench.calibration import calibration_lines

FAMILY_LABELS = {"ffg": "FFG", "flow": "Flow", "iaf": "IAF", "planar": "Planar", "hierarchical": "Hier"}
# rows of L[q*]: the flows above the FFG, as in Table 2; the two-layer model's q(z1) q(z2|z1) last
FAMILY_ORDER = ("flow", "iaf", "planar", "ffg", "hierarchical")
GAP_ROWS = (("approximation", "approximation gap"), ("amortization", "amortization gap"),
            ("inference", "inference gap"))


def _label(family: str) -> str:
    return FAMILY_LABELS.get(family, family)


def decimals_for(stderr: float, *, significant: int = 2, default: int = 3) -> int:
    """Decimal places that show ``stderr`` to ``significant`` digits (0.0025 -> 4, 0.31 -> 2, 1.5 -> 1,
    15 or more -> 0); ``default`` for a standard error that is zero or not finite."""
    if not math.isfinite(stderr) or stderr <= 0:
        return default
    return max(0, significant - 1 - math.floor(math.log10(stderr)))


def format_mean_stderr(mean: float, stderr: float) -> tuple[str, str]:
    """Mean and standard error to the precision the standard error warrants: the standard error to 2
    significant digits, the mean to the same decimal place (so never "0.31 ± 0.00")."""
    digits = decimals_for(stderr)
    return f"{mean:.{digits}f}", f"{stderr:.{digits}f}"


def gap_table_markdown(summary: dict) -> str:
    """A Markdown table of one run's bounds and gaps: mean, standard error over datapoints and Monte
    Carlo standard error, in nats; the mean and its standard error to the precision that standard
    error warrants (:func:`format_mean_stderr`), the Monte Carlo standard error to 2 significant digits.

    ``summary`` is the dict written to ``summary.json``. L[q*] gets one row per refined family
    (``bounds.elbo_q_star_<family>``); a summary without those shows the single ``elbo_q_star``. A line
    under the table counts the datapoints left out for numerical faults, and those whose AIS was flagged
    unhealthy (``gapbench.estimators.health``), if any.
    """
    bounds = summary["bounds"]
    star_rows = [(f"elbo_q_star_{f}", f"L[q*_{_label(f)}]") for f in FAMILY_ORDER if f"elbo_q_star_{f}" in bounds]
    rows = [("bounds", "log_px", "log p̂(x)"),
            *[("bounds", key, label) for key, label in (star_rows or [("elbo_q_star", "L[q*]")])],
            ("bounds", "elbo_q", "L[q]"),
            *[("gaps", key, label) for key, label in GAP_ROWS]]
    lines = [
        "| quantity | mean (nats) | ± stderr | ± MC stderr |",
        "|---|---:|---:|---:|",
    ]
    for block, key, label in rows:
        entry = summary[block][key]
        mc = entry.get("mc_stderr", float("nan"))
        mean, stderr = format_mean_stderr(entry["mean"], entry["stderr"])
        lines.append(f"| {label} | {mean} | {stderr} | {mc:.{decimals_for(mc)}f} |")
    method = summary.get("settings", {}).get("log_px")
    if method:
        lines += ["", f"log p̂(x): {method}."]
    if summary.get("ais_calibration"):
        lines += ["", *calibration_lines(summary["ais_calibration"])]
    faults = summary.get("faults") or {}
    if faults.get("num_faulty"):
        counts = ", ".join(f"{name}: {count}" for name, count in faults["counts"].items())
        lines += ["", f"{faults['num_faulty']} of {faults['num_datapoints']} datapoints had numerical faults "
                      f"({counts}) and are left out of the means; see datapoints.csv, column fault."]
    unhealthy = ((summary.get("ais") or {}).get("unhealthy") or {})
    if unhealthy.get("num_unhealthy"):
        reasons = ", ".join(f"{name}: {count}" for name, count in unhealthy.items()
                            if name != "num_unhealthy" and count)
        lines += ["", f"AIS was flagged unhealthy for {unhealthy['num_unhealthy']} of "
                      f"{faults.get('num_datapoints', '?')} datapoints ({reasons}) and left out of their log p̂(x); "
                      "see datapoints.csv, column ais_unhealthy."]
    return "\n".join(lines) + "\n"


# --- the cross-family table (Table 2) -----------------------------------------------------------------

def encoder_family(summary: dict) -> str:
    """The family of a run's encoder (``settings.encoder_family``; "ffg" for a summary without it)."""
    return summary.get("settings", {}).get("encoder_family", "ffg")


def local_bound(summary: dict, family: str) -> dict | None:
    """L[q*_family] of a run, or None where that family was not refined: ``bounds.elbo_q_star_<family>``, or
    for a summary of one refined family (``settings.refinement.family``, no ``families``) ``bounds.elbo_q_star``."""
    bounds = summary["bounds"]
    if f"elbo_q_star_{family}" in bounds:
        return bounds[f"elbo_q_star_{family}"]
    refinement = summary.get("settings", {}).get("refinement", {})
    if "families" not in refinement and refinement.get("family", "ffg") == family:
        return bounds.get("elbo_q_star")
    return None


def cross_family_rows(summaries: Sequence[dict], labels: Sequence[str] | None = None) -> list[dict]:
    """The table in long form: one dict per (quantity, model) with its mean and standard errors.

    Quantities, as in Cremer et al. (2018, Table 2): log p̂(x), L[q*] of every refined family (flows
    first), L[q], and the approximation, amortization and inference gaps; each model's gaps use its
    own encoder's family. ``labels`` name the columns (default: q_FFG, q_Flow, ... by encoder family,
    with the run name added where two runs share a family).
    """
    labels = list(labels) if labels is not None else column_labels(summaries)
    families = [f for f in FAMILY_ORDER if any(local_bound(s, f) is not None for s in summaries)]
    quantities = [("log_px", "log p̂(x)", lambda s: s["bounds"]["log_px"])]
    quantities += [(f"elbo_q_star_{f}", f"L[q*_{_label(f)}]", lambda s, f=f: local_bound(s, f)) for f in families]
    quantities += [("elbo_q", "L[q]", lambda s: s["bounds"]["elbo_q"])]
    quantities += [(key, label.replace(" gap", ""), lambda s, key=key: s["gaps"][key]) for key, label in GAP_ROWS]
    rows = []
    for key, name, get in quantities:
        for summary, label in zip(summaries, labels):
            entry = get(summary) or {}
            rows.append({
                "quantity": key, "label": name, "model": label,
                "run": summary.get("settings", {}).get("name", ""), "encoder_family": encoder_family(summary),
                "mean": entry.get("mean", math.nan), "stderr": entry.get("stderr", math.nan),
                "mc_stderr": entry.get("mc_stderr", math.nan), "num_datapoints": entry.get("num_datapoints", 0),
            })
    return rows


def column_labels(summaries: Sequence[dict]) -> list[str]:
    """q_FFG, q_Flow, ... by encoder family; the run name is added where two runs share a family."""
    families = [encoder_family(s) for s in summaries]
    labels = []
    for summary, family in zip(summaries, families):
        label = f"q_{_label(family)}"
        if families.count(family) > 1:
            label += f" ({summary.get('settings', {}).get('name', '?')})"
        labels.append(label)
    return labels


def table_grid(rows: list[dict]) -> tuple[list[str], list[str], dict[tuple[str, str], dict]]:
    """Long-form rows as a grid: the quantity labels, the model labels (in order), and the rows by (label, model)."""
    quantities = list(dict.fromkeys(r["label"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    return quantities, models, {(r["label"], r["model"]): r for r in rows}


def _cell(row: dict, plus_minus: str) -> str:
    if not math.isfinite(row["mean"]):
        return "—" if plus_minus == " ± " else "--"
    return plus_minus.join(format_mean_stderr(row["mean"], row["stderr"]))


def cross_family_markdown(rows: list[dict]) -> str:
    """Markdown: quantities down, models across; cells 'mean ± standard error over datapoints', to the
    precision the standard error warrants (:func:`format_mean_stderr`)."""
    quantities, models, cell = table_grid(rows)
    lines = ["| | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for q in quantities:
        lines.append(f"| {q} | " + " | ".join(_cell(cell[q, m], " ± ") for m in models) + " |")
    return "\n".join(lines) + "\n"


def cross_family_csv(rows: list[dict]) -> str:
    """CSV in long form (one line per quantity and model), every number at full precision."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


_LATEX_QUANTITY = {"log p̂(x)": r"$\log \hat p(x)$", "L[q]": r"$\mathcal{L}[q]$",
                   "approximation": "Approximation", "amortization": "Amortization", "inference": "Inference"}


def _latex_label(label: str) -> str:
    if label in _LATEX_QUANTITY:
        return _LATEX_QUANTITY[label]
    if label.startswith("L[q*_"):
        return r"$\mathcal{L}[q^*_{\mathrm{" + label[5:-1] + "}}]$"
    return label


def _latex_model(model: str) -> str:
    family, _, rest = model.partition(" ")
    name = family[2:] if family.startswith("q_") else family
    return r"$q_{\mathrm{" + name + "}}$" + (" " + rest.replace("_", r"\_") if rest else "")


def cross_family_latex(rows: list[dict]) -> str:
    """A booktabs LaTeX tabular laid out like Cremer et al. (2018, Table 2), mean ± standard error."""
    quantities, models, cell = table_grid(rows)
    lines = [r"\begin{tabular}{l" + "r" * len(models) + "}", r"\toprule",
             " & ".join(["", *[_latex_model(m) for m in models]]) + r" \\", r"\midrule"]
    for q in quantities:
        if q == "approximation":
            lines.append(r"\midrule")
        cells = [_cell(cell[q, m], r" $\pm$ ") for m in models]
        lines.append(" & ".join([_latex_label(q), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
