"""Benchmark: throughput of the full evaluation over 1, 2, ... processes, and the cost of per-datapoint streams.

Scaling: for each process count P, a fresh folder gets the run's config, checkpoint and training
record, and ``torchrun --nproc-per-node P -m gapbench run`` evaluates ``num_datapoints`` datapoints
in it (training is skipped: its record is there). Throughput is datapoints per second of the three
evaluation stages (L[q] and IWAE-k, refinement with L[q*] and IWAE-k under q*, AIS) as rank 0 records
them in stages.json, gathering included; the scaling efficiency of P processes is
throughput(P) / (P x throughput(1)). Each process gets ``threads`` torch threads.

Streams: IWAE-k and refinement in this process with one ``torch.Generator`` (the old design: noise
depends on the batch) against :class:`~gapbench.posteriors.DatapointStreams`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from gapbench import io
from gapbench.runner.run import open_run
from gapbench.measure import amortized_posterior, bounds_of, local_posterior
from gapbench.posteriors import DatapointStreams

EVALUATION_STAGES = ("amortized", "local", "ais")
RUN_FILES = ("config.json", "checkpoint.pt", "train_history.csv")


def _prepare(run_dir: Path, folder: Path) -> None:
    """A run folder holding ``run_dir``'s trained model and nothing evaluated (run with --force: the
    evaluation settings change, the train stage is kept)."""
    folder.mkdir(parents=True)
    for name in RUN_FILES:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, folder / name)
    stages = json.loads((run_dir / "stages.json").read_text())
    io.write_json(folder / "stages.json", {"train": stages["train"]})


def time_processes(run_dir: str | Path, num_processes: int, *, num_datapoints: int, threads: int = 1,
                   device: str = "cpu", overrides: tuple[str, ...] = (), workdir: Path) -> dict:
    """Evaluate ``num_datapoints`` of the run with ``num_processes`` torchrun processes; stage seconds."""
    run_dir, folder = Path(run_dir), workdir / f"processes_{num_processes}"
    _prepare(run_dir, folder)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_processes}",
               "-m", "gapbench", "run", str(folder / "config.json"), "--out", str(folder), "--quiet", "--force",
               "--device", device, "--set", f"eval.num_datapoints={num_datapoints}"]
    for item in overrides:
        command += ["--set", item]
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    stages = json.loads((folder / "stages.json").read_text())
    seconds = {stage: stages[stage]["seconds"] for stage in EVALUATION_STAGES if stage in stages}
    total = sum(seconds.values())
    return {"processes": num_processes, "threads_per_process": threads, "stage_seconds": seconds,
            "evaluation_seconds": total, "datapoints_per_second": num_datapoints / total,
            "wall_seconds": wall, "folder": str(folder)}


def stream_cost(run_dir: str | Path, *, num_datapoints: int, num_samples: int, repeats: int = 3) -> dict:
    """Seconds of IWAE-k and of refinement with one torch.Generator and with per-datapoint streams."""
    config, decoder, encoder, x = open_run(run_dir, num_datapoints=num_datapoints)
    q = amortized_posterior(encoder, x)
    procedure = config.refine.resolved()

    def generator(kind: str):
        return torch.Generator().manual_seed(0) if kind == "generator" else DatapointStreams.from_seed(0, range(len(x)))

    def iwae_seconds(kind: str) -> float:
        start = time.perf_counter()
        bounds_of(decoder, q, x, num_samples=num_samples, chunk_size=config.eval.chunk_size, generator=generator(kind))
        return time.perf_counter() - start

    def refine_seconds(kind: str) -> tuple[float, int]:
        start = time.perf_counter()
        result = local_posterior(decoder, encoder, x, init=config.refine.init, procedure=procedure,
                                 generator=generator(kind))
        return time.perf_counter() - start, int(result.num_steps.sum())

    warm = x[:10]
    bounds_of(decoder, amortized_posterior(encoder, warm), warm, num_samples=100, chunk_size=None,
              generator=torch.Generator())  # warm-up
    iwae_runs = {"generator": [], "streams": []}
    refine_runs = {"generator": [], "streams": []}
    for _ in range(repeats):  # alternating, so that a change in the machine's load hits both alike
        for kind in ("generator", "streams"):
            iwae_runs[kind].append(iwae_seconds(kind))
            refine_runs[kind].append(refine_seconds(kind))
    figures = {}
    for kind in ("generator", "streams"):  # the best of ``repeats`` each
        seconds, steps = min(refine_runs[kind])
        figures[kind] = {"iwae_seconds": min(iwae_runs[kind]), "refine_seconds": seconds,
                         "refine_datapoint_steps": steps,
                         "refine_microseconds_per_datapoint_step": 1e6 * seconds / steps}
    g, s = figures["generator"], figures["streams"]
    figures["iwae_overhead"] = s["iwae_seconds"] / g["iwae_seconds"] - 1
    figures["refine_overhead_per_step"] = (s["refine_microseconds_per_datapoint_step"]
                                           / g["refine_microseconds_per_datapoint_step"] - 1)
    figures.update(num_datapoints=len(x), k=num_samples, threads=torch.get_num_threads())
    return figures


def _differences(folders: list[str]) -> dict:
    """Per-datapoint agreement of the other folders with the first: the largest difference of each numeric
    column of datapoints.csv (absolute, or relative where the value exceeds 1 in size), and the datapoints
    whose refinement took another number of steps."""
    frames = [pd.read_csv(Path(f) / "datapoints.csv") for f in folders]
    numeric = frames[0].select_dtypes("number").columns
    def difference(a: np.ndarray, b: np.ndarray) -> float:  # relative above 1 in size (ESS runs to k)
        return float(np.nanmax(np.abs(a - b) / np.maximum(1.0, np.abs(a)))) if len(a) else 0.0
    largest = {c: max((difference(frames[0][c].to_numpy(float), f[c].to_numpy(float)) for f in frames[1:]),
                      default=0.0) for c in numeric}
    first_steps = frames[0]["refine_steps"].to_numpy()
    steps_differ = sorted({int(i) for f in frames[1:] for i in np.flatnonzero(f["refine_steps"].to_numpy() != first_steps)})
    column = max(largest, key=largest.get)
    return {"max_difference": largest[column], "max_difference_column": column, "by_column": largest,
            "refine_steps_differ": steps_differ}


def bench_scale(run_dir: str | Path, *, num_datapoints: int = 1000, processes: tuple[int, ...] = (1, 2),
                threads: int = 1, device: str = "cpu", overrides: tuple[str, ...] = (),
                stream_datapoints: int | None = None,
                log: Callable[[str], None] = print) -> dict:
    """Throughput of the full evaluation for each process count, and the per-datapoint streams' cost."""
    run_dir = Path(run_dir)
    log(f"timing per-datapoint streams against one torch.Generator ({threads} thread(s)) ...")
    with torch.random.fork_rng(devices=[]):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:  # first: it fails fast
            config = json.loads((run_dir / "config.json").read_text())
            streams = stream_cost(run_dir, num_datapoints=stream_datapoints or num_datapoints,
                                  num_samples=config["eval"]["num_samples"])
        finally:
            torch.set_num_threads(before)
    rows, agreement = [], None
    with tempfile.TemporaryDirectory(prefix="gapbench-scale-") as tmp:
        for p in processes:
            log(f"evaluating {num_datapoints} datapoints with {p} process(es) x {threads} thread(s) on {device} ...")
            rows.append(time_processes(run_dir, p, num_datapoints=num_datapoints, threads=threads, device=device,
                                       overrides=overrides, workdir=Path(tmp)))
        if len(rows) > 1:
            agreement = _differences([r["folder"] for r in rows])
    base = next((r for r in rows if r["processes"] == 1), None)
    for r in rows:
        r.pop("folder")
        r["scaling_efficiency"] = (r["datapoints_per_second"] / (r["processes"] * base["datapoints_per_second"])
                                   if base else None)
    figures = {"num_datapoints": num_datapoints, "device": device, "overrides": list(overrides), "scaling": rows,
               "agreement": agreement, "streams": streams,
               "cpu_count": os.cpu_count(), "torch": torch.__version__}
    log("")
    if rows:
        _log_scaling(rows, agreement, num_datapoints=num_datapoints, device=device, log=log)
    g, s = streams["generator"], streams["streams"]
    log(f"per-datapoint streams against one torch.Generator ({streams['num_datapoints']} datapoints, "
        f"{streams['threads']} thread(s)): IWAE-{streams['k']} {g['iwae_seconds']:.2f} s -> {s['iwae_seconds']:.2f} s "
        f"({streams['iwae_overhead']:+.0%}); refinement {g['refine_microseconds_per_datapoint_step']:.0f} -> "
        f"{s['refine_microseconds_per_datapoint_step']:.0f} us per datapoint-step "
        f"({streams['refine_overhead_per_step']:+.0%})")
    return figures


def _log_scaling(rows: list[dict], agreement: dict | None, *, num_datapoints: int, device: str,
                 log: Callable[[str], None]) -> None:
    log(f"full evaluation (L[q] and IWAE-k, refinement with L[q*] and IWAE-k, AIS) of {num_datapoints} datapoints "
        f"on {device}:")
    log("| processes | threads each | amortized s | local s | ais s | datapoints/s | scaling efficiency |")
    log("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s = r["stage_seconds"]
        efficiency = f"{r['scaling_efficiency']:.0%}" if r["scaling_efficiency"] is not None else "-"
        log(f"| {r['processes']} | {r['threads_per_process']} | {s.get('amortized', 0):.1f} | {s.get('local', 0):.1f} "
            f"| {s.get('ais', 0):.1f} | {r['datapoints_per_second']:.1f} | {efficiency} |")
    if agreement is not None:
        log(f"largest per-datapoint difference between process counts (relative above 1): "
            f"{agreement['max_difference']:.2e} ({agreement['max_difference_column']}); datapoints whose "
            f"refinement took another number of steps: {len(agreement['refine_steps_differ'])}")
