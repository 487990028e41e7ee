"""Figure: AIS and the BDMC sandwich against the number of annealing steps, on a linear-Gaussian
model whose log p(x) is known exactly.

    gapbench figure ais --out results/ais_linear_gaussian.png

Datapoints are simulated from the model, so the z that generated each x is an exact posterior
sample and reverse AIS can start from it. For every number of steps T, forward AIS (the estimate,
a stochastic lower bound) and reverse AIS (a stochastic upper bound) run on the same datapoints;
the figure shows their means over datapoints and the exact mean log p(x); error bars are standard
errors of the mean difference from the exact value (the same datapoints throughout, so the spread
of log p(x) across datapoints cancels).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd
import torch

from gapbench.estimators import AISProcedure, bdmc, simulate
from gapbench.models import LinearGaussian


def sandwich_by_steps(*, data_size: int = 100, latent_size: int = 10, num_datapoints: int = 50,
                      num_chains: int = 16, steps: tuple[int, ...] = (10, 30, 100, 300, 1000, 3000),
                      schedule: str = "sigmoid", seed: int = 0, log=print) -> pd.DataFrame:
    """One row per T: mean over datapoints of exact log p(x), forward and reverse AIS, with stderrs."""
    g = torch.Generator().manual_seed(seed)
    model = LinearGaussian.random(data_size, latent_size, sigma=0.7, scale=1.5, generator=g)
    x, z = simulate(model, num_datapoints, generator=g, dtype=torch.float64)
    exact = model.log_marginal(x)  # (N,)
    rows = []
    for num_steps in steps:
        start = time.perf_counter()
        procedure = AISProcedure(num_chains=num_chains, num_steps=num_steps, schedule=schedule)
        result = bdmc(model, x, z, procedure=procedure, generator=g)
        row = {"num_steps": num_steps, "exact": exact.mean().item(), "seconds": time.perf_counter() - start}
        for name, value in (("forward", result.lower.value), ("reverse", result.upper.value)):
            row[name] = value.mean().item()
            row[f"{name}_stderr"] = (value.std() / math.sqrt(num_datapoints)).item()
            row[f"{name}_error"] = (value - exact).mean().item()
            row[f"{name}_error_stderr"] = ((value - exact).std() / math.sqrt(num_datapoints)).item()
        row["gap"] = result.gap.mean().item()
        row["gap_stderr"] = (result.gap.std() / math.sqrt(num_datapoints)).item()
        rows.append(row)
        log(f"T = {num_steps}: forward {row['forward_error']:+.3f}, reverse {row['reverse_error']:+.3f} nats from "
            f"exact, gap {row['gap']:.3f} ({row['seconds']:.0f} s)")
    return pd.DataFrame(rows)


def plot(frame: pd.DataFrame, path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    t = frame["num_steps"]
    left.axhline(frame["exact"].iloc[0], color="black", lw=1, label="exact log p(x)")
    left.errorbar(t, frame["forward"], yerr=frame["forward_error_stderr"], marker="o", capsize=3,
                  label="forward AIS (estimate, lower bound)")
    left.errorbar(t, frame["reverse"], yerr=frame["reverse_error_stderr"], marker="s", capsize=3,
                  label="reverse AIS (upper bound)")
    left.set_xscale("log")
    left.set_xlabel("annealing steps T")
    left.set_ylabel("mean over datapoints (nats)")
    left.legend(fontsize=8)
    left.set_title("BDMC sandwich")
    right.errorbar(t, -frame["forward_error"], yerr=frame["forward_error_stderr"], marker="o", capsize=3,
                   label="exact - forward AIS")
    right.errorbar(t, frame["reverse_error"], yerr=frame["reverse_error_stderr"], marker="s", capsize=3,
                   label="reverse AIS - exact")
    right.plot(t, frame["gap"], color="grey", ls="--", label="BDMC gap (reverse - forward)")
    right.set_xscale("log")
    right.set_yscale("symlog", linthresh=0.01)
    right.set_ylim(bottom=0.0)
    right.set_xlabel("annealing steps T")
    right.set_ylabel("mean distance (nats)")
    right.legend(fontsize=8)
    right.set_title("distance from exact")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

