"""Benchmark: local flow refinement batched over datapoints against one datapoint at a time.

The authors' code (Cremer et al., 2018, optimize_local_expressive) fits a local flow for one
datapoint at a time. Here the same procedure (gapbench's preset for flows) runs once for N
datapoints in one batch, their flows' weights held in (N, ...) tensors, and once per datapoint with a
batch of one (timed on the first M datapoints and scaled to N). Both start from the same point and
take the same kind of steps, so the ratio of wall times measures batching alone; the final L[q*] of
the two on the M datapoints is reported to show they reach the same place. Optionally the paper's
procedure (Adam 1e-3, 50 samples, window test) is timed one datapoint at a time too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from gapbench.runner.config import RefineConfig
from gapbench.estimators import elbo
from gapbench.runner.run import open_run
from gapbench.measure import RefineProcedure, effective_procedure, local_posterior
from gapbench.posteriors import make_family


def _elbo(decoder, family, params, x, *, num_samples: int, seed: int) -> torch.Tensor:
    return elbo(decoder, family.posterior(params), x, num_samples=num_samples,
                generator=torch.Generator().manual_seed(seed)).value


def _one_at_a_time(decoder, encoder, x, *, family, init: str, procedure: RefineProcedure, seed: int,
                   log: Callable[[str], None], what: str) -> tuple[float, list[int], dict[str, torch.Tensor]]:
    """Refine x's datapoints one by one (batch size 1): seconds, steps per datapoint, parameters."""
    seconds, steps, results = 0.0, [], []
    for i in range(x.shape[0]):
        start = time.perf_counter()
        result = local_posterior(decoder, encoder, x[i:i + 1], family=family, init=init, procedure=procedure,
                                 generator=torch.Generator().manual_seed(seed + i))
        seconds += time.perf_counter() - start
        steps.append(int(result.num_steps[0]))
        results.append(result.params)
        log(f"  {what} datapoint {i + 1}/{x.shape[0]}: {steps[-1]} steps, {seconds:.1f} s so far")
    return seconds, steps, {k: torch.cat([p[k] for p in results]) for k in results[0]}


def bench_refine_flow(run_dir: str, *, family: str = "flow", num_datapoints: int = 1000,
                      reference_datapoints: int = 10, paper_datapoints: int = 0, num_samples: int = 1000,
                      init: str | None = None, num_steps: int | None = None, hidden_size: int | None = None,
                      seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Time batched against one-at-a-time local refinement of ``family``; returns the figures.

    ``num_steps``/``hidden_size`` default to the run's ``model.flow_steps``/``model.flow_hidden``;
    ``init`` to the config default ("encoder"); ``paper_datapoints`` > 0 also times the paper's
    procedure on that many datapoints, one at a time.
    """
    config, decoder, encoder, x = open_run(run_dir, num_datapoints=num_datapoints)
    for p in decoder.parameters():
        p.requires_grad_(False)
    local = make_family(family, num_steps=num_steps or config.model.flow_steps,
                        hidden_size=hidden_size or config.model.flow_hidden)
    defaults = RefineConfig()
    procedure = effective_procedure(local, defaults.resolved(family))
    init = init or defaults.init
    n, m = x.shape[0], min(reference_datapoints, x.shape[0])
    like = x[:1]
    params_per_datapoint = sum(v[0].numel() for v in local.init_params(1, config.model.latent_size, like=like,
                                                                        generator=torch.Generator()).values())
    log(f"run {run_dir}: {config.data.dataset}, D = {x.shape[1]}, Z = {config.model.latent_size}; local {family!r} "
        f"{local.sizes()} ({params_per_datapoint} parameters per datapoint), from the {init}; "
        f"{torch.get_num_threads()} threads")

    ref_seconds, ref_steps, ref_params = _one_at_a_time(decoder, encoder, x[:m], family=local, init=init,
                                                        procedure=procedure, seed=seed, log=log,
                                                        what="one at a time")
    start = time.perf_counter()
    result = local_posterior(decoder, encoder, x, family=local, init=init, procedure=procedure,
                             generator=torch.Generator().manual_seed(seed))
    batched_seconds = time.perf_counter() - start
    ref_elbo = _elbo(decoder, local, ref_params, x[:m], num_samples=num_samples, seed=seed + 1)
    ours_elbo = _elbo(decoder, local, result.params, x, num_samples=num_samples, seed=seed + 1)

    ref_total_steps, ours_total_steps = sum(ref_steps), int(result.num_steps.sum())
    figures: dict[str, Any] = {
        "family": family, "sizes": local.sizes(), "parameters_per_datapoint": params_per_datapoint,
        "init": init, "procedure": procedure._asdict(), "num_datapoints": n, "reference_datapoints": m,
        "threads": torch.get_num_threads(), "elbo_num_samples": num_samples,
        "one_at_a_time": {
            "batch_size": 1, "seconds_per_datapoint": ref_seconds / m, "seconds_scaled_to_all": ref_seconds / m * n,
            "mean_steps": ref_total_steps / m, "datapoint_steps_per_second": ref_total_steps / ref_seconds,
            "mean_elbo_q_star_subset": float(ref_elbo.mean()),
        },
        "batched": {
            "batch_size": n, "seconds": batched_seconds, "mean_steps": ours_total_steps / n,
            "datapoint_steps_per_second": ours_total_steps / batched_seconds,
            "mean_elbo_q_star_subset": float(ours_elbo[:m].mean()), "mean_elbo_q_star_all": float(ours_elbo.mean()),
            "converged_fraction": float(result.is_converged.float().mean()),
        },
    }
    r, b = figures["one_at_a_time"], figures["batched"]
    figures["speedup"] = r["seconds_scaled_to_all"] / batched_seconds
    figures["throughput_ratio"] = b["datapoint_steps_per_second"] / r["datapoint_steps_per_second"]
    figures["elbo_difference_subset"] = b["mean_elbo_q_star_subset"] - r["mean_elbo_q_star_subset"]
    rows = [("one at a time (batch size 1), same procedure", r["seconds_scaled_to_all"], r["mean_steps"],
             r["datapoint_steps_per_second"], r["mean_elbo_q_star_subset"]),
            (f"batched ({n} at once)", batched_seconds, b["mean_steps"], b["datapoint_steps_per_second"],
             b["mean_elbo_q_star_subset"])]
    if paper_datapoints > 0:
        p_m = min(paper_datapoints, n)
        paper = effective_procedure(local, RefineProcedure.paper())
        p_seconds, p_steps, p_params = _one_at_a_time(decoder, encoder, x[:p_m], family=local, init="prior",
                                                      procedure=paper, seed=seed, log=log, what="paper procedure")
        p_elbo = _elbo(decoder, local, p_params, x[:p_m], num_samples=num_samples, seed=seed + 1)
        figures["paper_one_at_a_time"] = {
            "procedure": paper._asdict(), "init": "prior", "datapoints": p_m, "seconds_per_datapoint": p_seconds / p_m,
            "seconds_scaled_to_all": p_seconds / p_m * n, "mean_steps": sum(p_steps) / p_m,
            "datapoint_steps_per_second": sum(p_steps) / p_seconds, "mean_elbo_q_star_subset": float(p_elbo.mean()),
            "batched_mean_elbo_q_star_same_subset": float(ours_elbo[:p_m].mean()),
        }
        figures["speedup_over_paper"] = p_seconds / p_m * n / batched_seconds
        pr = figures["paper_one_at_a_time"]
        rows.append((f"paper's procedure one at a time, from the prior (first {p_m})", pr["seconds_scaled_to_all"],
                     pr["mean_steps"], pr["datapoint_steps_per_second"], pr["mean_elbo_q_star_subset"]))
    log("")
    log(f"local {family!r} q* for {n} datapoints (one-at-a-time timed on {m} and scaled per datapoint); "
        f"L[q*] with {num_samples} samples on the first {m}")
    log("| procedure | seconds | mean steps | datapoint-steps/s | mean L[q*] |")
    log("|---|---:|---:|---:|---:|")
    for label, seconds, steps, rate, value in rows:
        log(f"| {label} | {seconds:.1f} | {steps:.0f} | {rate:.0f} | {value:.3f} |")
    log(f"batched vs one at a time: {figures['speedup']:.1f}x wall time ({figures['throughput_ratio']:.1f}x "
        f"datapoint-steps per second); L[q*] difference {figures['elbo_difference_subset']:+.3f} nats; "
        f"mean L[q*] over all {n}: {b['mean_elbo_q_star_all']:.3f}")
    if "speedup_over_paper" in figures:
        log(f"batched vs the paper's procedure one at a time: {figures['speedup_over_paper']:.1f}x")
    return figures
