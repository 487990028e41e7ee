"""Gap tables from a run's summary: Markdown for the terminal and README-style reports."""

from __future__ import annotations

ROWS = (
    ("bounds", "log_px", "log p̂(x)"),
    ("bounds", "elbo_q_star", "L[q*]"),
    ("bounds", "elbo_q", "L[q]"),
    ("gaps", "approximation", "approximation gap"),
    ("gaps", "amortization", "amortization gap"),
    ("gaps", "inference", "inference gap"),
)


def gap_table_markdown(summary: dict, *, digits: int = 3) -> str:
    """A Markdown table of the bounds and gaps: mean, standard error over datapoints and Monte Carlo
    standard error, in nats.

    ``summary`` is the dict written to ``summary.json`` (``{"bounds": ..., "gaps": ...}``); a line
    under the table counts the datapoints left out for numerical faults, if any.
    """
    lines = [
        "| quantity | mean (nats) | ± stderr | ± MC stderr |",
        "|---|---:|---:|---:|",
    ]
    for block, key, label in ROWS:
        entry = summary[block][key]
        mc = entry.get("mc_stderr", float("nan"))
        lines.append(f"| {label} | {entry['mean']:.{digits}f} | {entry['stderr']:.{digits}f} | {mc:.{digits}f} |")
    faults = summary.get("faults") or {}
    if faults.get("num_faulty"):
        counts = ", ".join(f"{name}: {count}" for name, count in faults["counts"].items())
        lines += ["", f"{faults['num_faulty']} of {faults['num_datapoints']} datapoints had numerical faults "
                      f"({counts}) and are left out of the means; see datapoints.csv, column fault."]
    return "\n".join(lines) + "\n"
