"""Benchmark: the paper's local-FFG procedure, one datapoint at a time, against gapbench's default.

Both optimise the same local FFG for the same datapoints of a trained run. The reference is the
2018 code's procedure (Adam lr 1e-3 from the prior, 50 samples a step, a check every 100 steps, stop
after more than 10 checks without improvement) run with batch size 1, as that code does; it is timed
on a subset and scaled per datapoint. gapbench's default procedure runs batched over all datapoints.
Each final L[q*] is estimated with the same number of samples (not timed), so the two can be
compared: the speed-up counts only if gapbench reaches the same mean L[q*] (within ``tolerance``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from gapbench.runner.config import RefineConfig
from gapbench.estimators import elbo
from gapbench.runner.run import open_run
from gapbench.measure import RefineProcedure, local_posterior
from gapbench.posteriors import get_family


def _final_elbo(decoder, params, x, *, num_samples: int, seed: int) -> torch.Tensor:
    q = get_family("ffg").posterior(params)
    return elbo(decoder, q, x, num_samples=num_samples, generator=torch.Generator().manual_seed(seed)).value


def bench_refine(run_dir: str, *, num_datapoints: int = 1000, reference_datapoints: int = 20,
                 num_samples: int = 5000, tolerance: float = 0.05, init: str | None = None, seed: int = 0,
                 log: Callable[[str], None] = print) -> dict:
    """Time both procedures; returns the figures as a dict (also printed through ``log``).

    ``init`` is where gapbench's procedure starts ("encoder" or "prior"; None: the config default).
    """
    config, decoder, encoder, x = open_run(run_dir, num_datapoints=num_datapoints)
    for p in decoder.parameters():
        p.requires_grad_(False)
    n, m = x.shape[0], min(reference_datapoints, x.shape[0])
    torch.set_num_threads(torch.get_num_threads())
    log(f"run {run_dir}: {config.data.dataset}, D = {x.shape[1]}, Z = {config.model.latent_size}, "
        f"decoder hidden {config.model.decoder_hidden}; {torch.get_num_threads()} threads")

    # --- reference: paper procedure, batch size 1, on the first m datapoints ---------------------
    paper = RefineProcedure.paper()
    ref_results, ref_steps, ref_seconds = [], [], 0.0
    for i in range(m):
        start = time.perf_counter()
        result = local_posterior(decoder, encoder, x[i:i + 1], init="prior", procedure=paper,
                                 generator=torch.Generator().manual_seed(seed + i))
        ref_seconds += time.perf_counter() - start
        ref_results.append(result.params)
        ref_steps.append(int(result.num_steps[0]))
        log(f"  reference datapoint {i + 1}/{m}: {ref_steps[-1]} steps, {ref_seconds:.1f} s so far")
    ref_params = {k: torch.cat([p[k] for p in ref_results]) for k in ref_results[0]}
    ref_elbo = _final_elbo(decoder, ref_params, x[:m], num_samples=num_samples, seed=seed + 1)

    # --- gapbench default, batched over all n datapoints -------------------------------------------
    default = RefineConfig()
    procedure = default.resolved()
    init = init or default.init
    start = time.perf_counter()
    result = local_posterior(decoder, encoder, x, init=init, procedure=procedure,
                             generator=torch.Generator().manual_seed(seed))
    ours_seconds = time.perf_counter() - start
    ours_elbo = _final_elbo(decoder, result.params, x, num_samples=num_samples, seed=seed + 1)

    ref_per_datapoint = ref_seconds / m
    ref_total_steps = sum(ref_steps)
    ours_total_steps = int(result.num_steps.sum())
    figures: dict[str, Any] = {
        "num_datapoints": n,
        "reference_datapoints": m,
        "threads": torch.get_num_threads(),
        "reference": {
            "procedure": paper._asdict(), "init": "prior", "batch_size": 1,
            "seconds_per_datapoint": ref_per_datapoint,
            "seconds_scaled_to_all": ref_per_datapoint * n,
            "mean_steps": ref_total_steps / m,
            "datapoint_steps_per_second": ref_total_steps / ref_seconds,
            "mean_elbo_q_star_subset": float(ref_elbo.mean()),
        },
        "gapbench": {
            "procedure": procedure._asdict(), "init": init, "batch_size": n,
            "seconds": ours_seconds,
            "mean_steps": ours_total_steps / n,
            "datapoint_steps_per_second": ours_total_steps / ours_seconds,
            "mean_elbo_q_star_subset": float(ours_elbo[:m].mean()),
            "mean_elbo_q_star_all": float(ours_elbo.mean()),
            "converged_fraction": float(result.is_converged.float().mean()),
        },
    }
    difference = figures["gapbench"]["mean_elbo_q_star_subset"] - figures["reference"]["mean_elbo_q_star_subset"]
    figures["elbo_difference_subset"] = difference  # gapbench minus reference, nats
    figures["same_elbo"] = difference > -tolerance
    figures["speedup"] = ref_per_datapoint * n / ours_seconds
    figures["speedup_from_batching"] = (figures["gapbench"]["datapoint_steps_per_second"]
                                        / figures["reference"]["datapoint_steps_per_second"])
    figures["speedup_from_fewer_steps"] = figures["reference"]["mean_steps"] / figures["gapbench"]["mean_steps"]
    log("")
    log(f"local FFG q* for {n} datapoints ({m} for the reference loop, scaled per datapoint)")
    log("| procedure | seconds | mean steps | datapoint-steps/s | mean L[q*] (first "
        f"{m}) |")
    log("|---|---:|---:|---:|---:|")
    r, g = figures["reference"], figures["gapbench"]
    log(f"| paper, one at a time, from the prior | {r['seconds_scaled_to_all']:.1f} | {r['mean_steps']:.0f} | "
        f"{r['datapoint_steps_per_second']:.0f} | {r['mean_elbo_q_star_subset']:.3f} |")
    log(f"| gapbench, batched, from the {init} | {g['seconds']:.1f} | {g['mean_steps']:.0f} | "
        f"{g['datapoint_steps_per_second']:.0f} | {g['mean_elbo_q_star_subset']:.3f} |")
    log(f"speed-up {figures['speedup']:.1f}x (batching {figures['speedup_from_batching']:.1f}x, "
        f"fewer steps {figures['speedup_from_fewer_steps']:.1f}x); L[q*] difference "
        f"{difference:+.3f} nats ({'within' if figures['same_elbo'] else 'NOT within'} {tolerance} nats); "
        f"gapbench mean L[q*] over all {n}: {g['mean_elbo_q_star_all']:.3f}")
    return figures
