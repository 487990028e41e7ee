"""log p_hat(x) without selection bias (``gapbench bench log-px``): its bias on linear-Gaussian models
with exact log p(x), and its cost and effect on a finished run.

Without a run folder: for encoders whose amortization gap is 0.5, 6 and 20 nats (the exact optimal
diagonal Gaussian, perturbed: ``LinearGaussian.perturbed_encoder``), the mean error against exact
log p(x) of the per-datapoint max of the pilot bounds, of a fresh draw chosen on the largest pilot
value, and of gapbench's rule (``gapbench.estimators.log_px``), with the approximation gap each gives.
With a run folder: the seconds of the log_px stage against the others' (stages.json), and the mean
approximation gap with the new log p_hat(x) and with the old maximum (datapoints.csv).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gapbench.estimators.log_px import fresh_estimate, select_estimators
from gapbench.measure import fresh_estimators, local_posterior, measure_gaps, resolve_family
from gapbench.models import LinearGaussian

RULES = {"largest pilot value (penalty 0, no ESS guard)": {"penalty": 0.0, "min_ess": 0.0},
         "gapbench (value - 2 stderr, ESS >= 2)": {}}


def bench_linear_gaussian(*, num_datapoints: int = 200, num_samples: int = 5000, seed: int = 7,
                          gaps: tuple[float, ...] = (0.5, 6.0, 20.0)) -> dict:
    """Mean log p_hat - exact per encoder quality and rule, with the approximation gaps."""
    g = torch.Generator().manual_seed(seed)
    model = LinearGaussian.random(16, 3, sigma=0.7, scale=1.5, generator=g)
    x, _ = model.sample(num_datapoints, generator=g)
    exact = model.log_marginal(x).numpy()
    mean, var = model.optimal_diagonal(x)
    exact_approximation = float((model.log_marginal(x) - model.elbo_diagonal(x, mean, var)).mean())
    figures = {"settings": {"data_size": 16, "latent_size": 3, "num_datapoints": num_datapoints,
                            "num_samples": num_samples, "seed": seed},
               "exact_approximation_gap": exact_approximation, "encoders": {}}
    for target in gaps:
        encoder, gap = model.perturbed_encoder(x, target)
        frame, _ = measure_gaps(model, encoder, x, num_samples=num_samples, init="encoder",
                                generator=torch.Generator().manual_seed(1))
        # fresh draws of both proposals for every datapoint, so any rule can be scored on the same draws
        result = local_posterior(model, encoder, x, init="encoder", generator=torch.Generator().manual_seed(5))
        fresh_g = torch.Generator().manual_seed(9)
        fns = fresh_estimators(model, x, encoder=encoder, q_stars={"iwae_q_star": (resolve_family("ffg"), result.params)},
                               num_samples=num_samples, chunk_size=None, ais=None, streams=lambda n, p: fresh_g)
        fresh = {c: fresh_estimate(np.array([c] * num_datapoints), fns).value.numpy() for c in ("iwae_q", "iwae_q_star")}
        elbo_q_star = frame["elbo_q_star"].to_numpy()
        rows = {"max of the pilot bounds": frame["max_pilot_bound"].to_numpy()}
        for name, rule in RULES.items():
            chosen = select_estimators(frame, ("iwae_q", "iwae_q_star"), **rule)
            rows[f"fresh draw, {name}"] = np.where(chosen == "iwae_q", fresh["iwae_q"], fresh["iwae_q_star"])
        figures["encoders"][f"{target:g}"] = {"amortization_gap": gap, "estimators": {
            name: {"mean_error": float((v - exact).mean()), "error_stderr": float((v - exact).std() / math.sqrt(len(v))),
                   "largest_error": float((v - exact).max()), "smallest_error": float((v - exact).min()),
                   "approximation_gap": float((v - elbo_q_star).mean())} for name, v in rows.items()}}
    return figures


def bench_run(run_dir: str | Path) -> dict:
    """Cost and effect of the new log p_hat(x) on a finished run folder."""
    run_dir = Path(run_dir)
    stages = json.loads((run_dir / "stages.json").read_text())
    frame = pd.read_csv(run_dir / "datapoints.csv")
    usable = frame[frame["fault"] == "ok"]
    n = len(frame)
    seconds = {stage: record["seconds"] for stage, record in stages.items()}
    evaluation = sum(v for k, v in seconds.items() if k not in ("train", "report"))
    old_gap = usable["max_pilot_bound"] - usable["elbo_q_star"]
    return {
        "run_dir": str(run_dir), "num_datapoints": n, "stage_seconds": seconds,
        "log_px_seconds": seconds.get("log_px"), "log_px_seconds_per_datapoint": seconds.get("log_px", math.nan) / n,
        "log_px_share_of_evaluation": seconds.get("log_px", math.nan) / evaluation,
        "approximation_gap": {"new": float(usable["approximation"].mean()), "max_of_pilot_bounds": float(old_gap.mean()),
                              "change": float(usable["approximation"].mean() - old_gap.mean()),
                              "change_stderr": float((usable["log_px"] - usable["max_pilot_bound"]).std() / math.sqrt(len(usable)))},
        "log_px_source_counts": {k: int(v) for k, v in usable["log_px_source"].value_counts().items()},
    }


def print_figures(figures: dict) -> None:
    if "encoders" in figures:
        s = figures["settings"]
        print(f"linear-Gaussian, D = {s['data_size']}, Z = {s['latent_size']}, {s['num_datapoints']} datapoints, "
              f"k = {s['num_samples']}; exact approximation gap {figures['exact_approximation_gap']:.4f}")
        for target, entry in figures["encoders"].items():
            print(f"\nencoder with amortization gap {entry['amortization_gap']:.3f} nats")
            print("| log p_hat(x) | mean - exact | ± stderr | largest | smallest | approximation gap |")
            print("|---|---:|---:|---:|---:|---:|")
            for name, e in entry["estimators"].items():
                print(f"| {name} | {e['mean_error']:+.4f} | {e['error_stderr']:.4f} | {e['largest_error']:+.3f} | "
                      f"{e['smallest_error']:+.3f} | {e['approximation_gap']:.4f} |")
    else:
        gap = figures["approximation_gap"]
        print(f"{figures['run_dir']}: {figures['num_datapoints']} datapoints; stage seconds {figures['stage_seconds']}")
        print(f"log_px stage: {figures['log_px_seconds']} s ({figures['log_px_seconds_per_datapoint']:.4f} s per "
              f"datapoint, {100 * figures['log_px_share_of_evaluation']:.1f}% of the evaluation stages)")
        print(f"mean approximation gap: {gap['new']:.4f} (fresh draw) against {gap['max_of_pilot_bounds']:.4f} (max of "
              f"the pilot bounds): {gap['change']:+.4f} ± {gap['change_stderr']:.4f}")
        print(f"log_px_source: {figures['log_px_source_counts']}")
