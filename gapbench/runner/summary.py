"""summary.json of a run: means with standard errors, fault counts, and every setting that changes a number."""

from __future__ import annotations

import hashlib
import platform

import numpy as np
import pandas as pd
import torch

from gapbench.data import Dataset
from gapbench.estimators.health import health_counts
from gapbench.estimators.log_px import method_description
from gapbench.gaps import NO_FAULT, summarize, summarize_column
from gapbench.measure import effective_procedure
from gapbench.runner.build import local_family, log_px_candidates
from gapbench.runner.config import ExperimentConfig
from gapbench.runner.stage_table import hashed_sections

RANDOM_STREAMS = ("per datapoint: SplitMix64 counter streams keyed by (seed, stage, datapoint index), "
                  "independent of batch, shard and number of ranks")


def versions() -> dict[str, str]:
    from gapbench import __version__
    return {"gapbench": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "pandas": pd.__version__}


def run_summary(config: ExperimentConfig, frame: pd.DataFrame, x: torch.Tensor, dataset: Dataset, training: dict,
                device: torch.device) -> dict:
    """The summary of datapoints.csv's ``frame`` (faulty datapoints left out of the means)."""
    summary = summarize(frame)
    usable = frame[frame["fault"] == NO_FAULT]
    candidates = log_px_candidates(config)
    for name in config.refine.families:  # L[q*] of every refined family, on the same datapoints
        column = f"elbo_q_star_{name}"
        summary["bounds"][column] = summarize_column(usable[column], usable[f"{column}_stderr"])
    summary["other_bounds"] = {name: summarize_column(usable[name], usable[f"{name}_stderr"])
                               for name in candidates}
    # the per-datapoint max of the pilot bounds: biased upward (a max of noisy estimates), in no gap and
    # no regression check
    summary["diagnostics"] = {"max_pilot_bound": summarize_column(usable["max_pilot_bound"])}
    summary["estimators"] = estimator_descriptions(config)
    summary["log_px_source_counts"] = {k: int(v) for k, v in usable["log_px_source"].value_counts().items()}
    summary["refinement"] = {name: {
        "mean_steps": float(frame[f"refine_steps_{name}"].mean()),
        "max_steps_taken": int(frame[f"refine_steps_{name}"].max()),
        "converged_fraction": float(frame[f"refine_converged_{name}"].mean()),
        "diverged_count": int(frame[f"refine_diverged_{name}"].sum()),
    } for name in config.refine.families}
    if config.ais.enabled:
        summary["ais"] = {
            "mean_acceptance_rate": float(frame["ais_acceptance_rate"].mean()),
            "mean_step_size": float(frame["ais_step_size"].mean()),
            "mean_divergence_rate": float(frame["ais_divergence_rate"].mean()),
            "mean_ess": float(frame["ais_ess"].mean()),
            "min_ess": float(frame["ais_ess"].min()),
            "unhealthy": health_counts(frame),
        }
    summary["settings"] = settings(config, x, dataset, device)
    summary["training"] = training
    summary["data"] = dataset.provenance
    summary["versions"] = versions()
    return summary


def estimator_descriptions(config: ExperimentConfig) -> dict[str, str]:
    """What produced each bound of the summary's "bounds" and "other_bounds"."""
    num_samples, families, candidates = config.eval.num_samples, config.refine.families, log_px_candidates(config)
    ais = config.ais
    return {
        "elbo_q": f"ELBO, {num_samples} samples of the encoder's q",
        "iwae_q": f"IWAE-{num_samples} under the encoder's q",
        "elbo_q_star": f"ELBO, {num_samples} samples of q*_{config.model.posterior} (the encoder's family)",
        **{f"elbo_q_star_{f}": f"ELBO, {num_samples} samples of q*_{f}" for f in families},
        **{f"iwae_q_star_{f}": f"IWAE-{num_samples} under q*_{f}" for f in families},
        **({"ais": f"AIS, {ais.num_chains} chains x {ais.num_steps} steps from {ais.init}"} if ais.enabled else {}),
        "log_px": method_description(candidates),
        "max_pilot_bound": "per-datapoint max of " + ", ".join(candidates) + " (diagnostic: biased upward, in no gap)",
    }


def settings(config: ExperimentConfig, x: torch.Tensor, dataset: Dataset, device: torch.device) -> dict:
    """Every setting that changes a number of the run."""
    families, resolved = config.refine.families, config.model_dump(mode="json")
    data = config.data
    return {
        "name": config.name,
        "seed": config.seed,
        "dataset": dataset.name,
        "split": config.eval.split,
        "num_datapoints": config.eval.num_datapoints,
        "datapoints": f"the first {config.eval.num_datapoints} of the {config.eval.split} split",
        "binarization": {"mode": data.binarization, "threshold": data.threshold,
                         "evaluation_stream_seed": config.seed if data.binarization == "dynamic" else None},
        "likelihood": {"name": config.model.likelihood,
                       "num_levels": dataset.num_levels if config.model.likelihood == "logistic" else 2,
                       "bits": data.bits},
        "evaluation_data_sha256": hashlib.sha256(x.numpy().tobytes()).hexdigest(),
        "num_samples": {"elbo": config.eval.num_samples, "iwae_k": config.eval.num_samples,
                        "elbo_and_iwae_share_samples": True},
        "chunk_size": config.eval.chunk_size,
        "random_streams": RANDOM_STREAMS,
        "device": device.type,
        "log_px": method_description(log_px_candidates(config)),
        "encoder_family": config.model.posterior,
        "refinement": {"families": list(families), "init": config.refine.init, "preset": config.refine.procedure,
                       **({"flow_init": config.refine.flow_init} if config.refine.flow_init != "init" else {}),
                       "procedures": {name: effective_procedure(local_family(config, name),
                                                                config.refine.resolved(name))._asdict()
                                      for name in families}},
        "ais": hashed_sections(resolved, "report")["ais"],  # the health thresholds when set
        **({"curve": config.curve.model_dump(mode="json")} if config.curve.enabled else {}),
        "model": config.model.model_dump(mode="json"),
        "train": hashed_sections(resolved, "train")["train"],  # semi_amortized_* only when K > 0
    }
