"""Gaps over training: L[q], L[q*] and log p̂(x) of each saved training snapshot, on the first N
training and the first N validation datapoints (Cremer, Li & Duvenaud, 2018, section 5.4, follow how
the gaps of training and held-out points drift apart as training goes on).

A run trained with ``train.snapshot_every = N`` holds ``snapshots/epoch_NNNNN.pt``; for each, the
encoder's L[q], the local FFG's L[q*] (refined from the encoder's output with gapbench's procedure)
and log p̂(x) (a fresh IWAE under q or q*, whichever did better on a pilot draw: ``gapbench.estimators.log_px``) are estimated with ``num_samples`` samples by
:func:`gapbench.measure_gaps`, with the same datapoints and random stream for every snapshot.
Writes ``track.csv`` (long form: epoch, split, quantity, mean, stderr, mc_stderr).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from gapbench import io
from gapbench.runner.checkpoints import load_weights, safe_load
from gapbench.runner.config import load_config
from gapbench.runner.run import SNAPSHOTS, dataset_of, evaluation_data, networks_for
from gapbench.measure import measure_gaps
from gapbench.runner.rundir import RunError

SPLITS = ("train", "valid")


def snapshot_paths(run_dir: str | Path) -> list[Path]:
    paths = sorted((Path(run_dir) / SNAPSHOTS).glob("epoch_*.pt"))
    if not paths:
        raise RunError(f"{run_dir} has no training snapshots ({SNAPSHOTS}/epoch_*.pt); train the run with "
                       "--set train.snapshot_every=N (e.g. experiments/digits_track.toml)")
    return paths


def track(run_dir: str | Path, *, num_datapoints: int = 100, num_samples: int = 1000, progress: bool = True,
          log: Callable[[str], None] = print) -> pd.DataFrame:
    """Bounds and gaps of every snapshot on both splits; also written to RUN_DIR/track.csv."""
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise RunError(f"{run_dir} is not a gapbench run (no config.json)")
    paths = snapshot_paths(run_dir)
    config = load_config(run_dir / "config.json", ignore_unknown=True)
    dataset = dataset_of(config)
    data = {}
    for split in SPLITS:
        sized = config.model_copy(update={"eval": config.eval.model_copy(update={"split": split,
                                                                                 "num_datapoints": num_datapoints})})
        data[split] = evaluation_data(sized, dataset)
    decoder, encoder = networks_for(config, dataset)
    rows = []
    for path in tqdm(paths, desc="snapshots", disable=not progress):
        snapshot = safe_load(path, "gapbench training snapshot", "delete it, or retrain with train.snapshot_every")
        if not isinstance(snapshot, dict) or not isinstance(snapshot.get("epoch"), int):
            raise RunError(f"{path} is not a gapbench training snapshot (no epoch); delete it, or retrain with "
                           "train.snapshot_every")
        load_weights(path, snapshot, decoder, encoder)
        for split, x in data.items():
            generator = torch.Generator().manual_seed(config.seed)  # the same noise for every snapshot
            _, summary = measure_gaps(decoder, encoder, x, family="ffg", init="encoder", num_samples=num_samples,
                                      generator=generator)
            for block in ("bounds", "gaps"):
                for quantity, entry in summary[block].items():
                    rows.append({"epoch": snapshot["epoch"], "split": split, "quantity": quantity,
                                 "mean": entry["mean"], "stderr": entry["stderr"], "mc_stderr": entry["mc_stderr"]})
        log(f"[track] epoch {snapshot['epoch']}: amortization gap "
            + ", ".join(f"{r['split']} {r['mean']:.3f}" for r in rows[-8:] if r["quantity"] == "amortization"))
    frame = pd.DataFrame(rows)
    io.write_csv(run_dir / "track.csv", frame)
    return frame
