"""Benchmark: torch threads on a machine other processes also use.

Two measurements, each with and without ``busy`` competing processes (``python -c "while True:
pass"``, one per core the benchmark may fill) started beside it:

1. one step of the decoder (forward and backward) of ``rows`` rows, with 1 and with 2 torch threads:
   where a second thread starts to pay (``gapbench.runner.device.FLOP_PER_THREAD``);
2. the whole job, ``gapbench run EXPERIMENT --quiet --no-figures`` in a fresh folder (a subprocess,
   wall clock), with ``--threads C`` (C: the usable cores, torch's default before threads were chosen
   per stage; skipped with ``before=False``) and with the per-stage choice; the figure that matters is
   the busy/quiet ratio of each. The job's CPU seconds are reported too: when they are the same quiet
   and busy, the busy run lost only the share of the cores the busy processes took (with one thread
   against two spinning processes on two cores, a fair scheduler gives 2/3 of a core: 1.5x).

Every figure is the wall-clock time of this one invocation; the ratios compare times measured in it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

SPIN = "while True: pass"


class Busy:
    """``count`` processes that each keep one core busy, for the duration of a ``with`` block."""

    def __init__(self, count: int):
        self.count, self.processes = count, []

    def __enter__(self) -> "Busy":
        self.processes = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(self.count)]
        time.sleep(0.5)  # let them start spinning
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            process.kill()
            process.wait()


def step_seconds(rows: int, threads: int, *, widths: tuple[int, ...] = (16, 128, 128, 64),
                 min_flop: float = 1e9) -> tuple[float, float]:
    """Best of 3 of the mean time of a forward and backward pass of an ELU MLP of ``widths`` over
    ``rows`` rows, with ``threads`` torch threads; and the FLOPs of one pass (3 x 2 per weight per row)."""
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ELU()]
    net = torch.nn.Sequential(*layers[:-1])
    flop = 3 * 2 * rows * sum(a * b for a, b in zip(widths, widths[1:]))
    z = torch.randn(rows, widths[0], generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        repeats = max(3, int(min_flop / flop))
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(repeats):
                net(z).square().sum().backward()
            best = min(best, (time.perf_counter() - start) / repeats)
    finally:
        torch.set_num_threads(before)
    return best, flop


def job_seconds(experiment: str, overrides: tuple[str, ...], threads: int | None) -> dict:
    """``gapbench run`` in a fresh folder (a subprocess without OMP_NUM_THREADS): its wall-clock seconds
    (``wall_s``), the CPU seconds it used (``cpu_s``, user + system: equal quiet and busy when the
    difference in wall time is the share of the cores other processes took) and each stage's seconds
    (``stages``, from the run's stages.json)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "gapbench", "run", experiment, "--out", str(Path(folder) / "run"),
                   "--quiet", "--no-figures", *[a for item in overrides for a in ("--set", item)],
                   *(["--threads", str(threads)] if threads else [])]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        records = json.loads((Path(folder) / "run" / "stages.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "stages": {stage: record["seconds"] for stage, record in records.items()}}


def bench_threads(experiment: str, *, overrides: tuple[str, ...] = (), busy: int = 2,
                  rows: tuple[int, ...] = (400, 1600, 6400, 25600), job: bool = True, steps: bool = True,
                  before: bool = True, log: Callable[[str], None] = print) -> dict:
    """Time both measurements quiet and busy; returns the figures (also printed through ``log``)."""
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()
    log(f"{cores} usable cores; load average {load[0]:.1f} (1 min) when the benchmark started; busy: "
        f"{busy} processes running `{SPIN}` beside the timed code")
    figures: dict = {"cores": cores, "busy_processes": busy, "load_average_at_start": load[0], "steps": [],
                     "jobs": []}
    if steps:
        log("\n| decoder step (fwd+bwd) | GFLOP | load | 1 thread ms | 2 threads ms | 2-thread speed-up |")
        log("|---|---:|---|---:|---:|---:|")
    for condition in ("quiet", "busy") if steps else ():
        with Busy(busy if condition == "busy" else 0):
            for n in rows:
                one, flop = step_seconds(n, 1)
                two, _ = step_seconds(n, 2)
                figures["steps"].append({"rows": n, "gflop": flop / 1e9, "load": condition, "one_thread_s": one,
                                         "two_threads_s": two})
                log(f"| {n} rows | {flop / 1e9:.3g} | {condition} | {one * 1e3:.2f} | {two * 1e3:.2f} "
                    f"| {one / two:.2f} |")
    if not job:
        return figures
    settings = ((f"--threads {cores} (before: torch's default)", cores),) if before else ()
    settings += (("per stage (after)", None),)
    timed: dict = {}
    for condition in ("quiet", "busy"):
        with Busy(busy if condition == "busy" else 0):
            for label, threads in settings:
                result = timed[label, condition] = job_seconds(experiment, overrides, threads)
                log(f"  {label}, {condition}: {result['wall_s']:.1f} s ({result['cpu_s']:.1f} CPU s; "
                    f"stages {result['stages']})")
    command = " ".join(["gapbench run", experiment, *[f"--set {o}" for o in overrides]])
    log(f"\n| `{command}` | quiet s | busy s | busy / quiet | CPU s quiet / busy |")
    log("|---|---:|---:|---:|---:|")
    for label, threads in settings:
        quiet, loaded = timed[label, "quiet"], timed[label, "busy"]
        figures["jobs"].append({"threads": threads or "per stage", "quiet_s": quiet["wall_s"],
                                "busy_s": loaded["wall_s"], "ratio": loaded["wall_s"] / quiet["wall_s"],
                                "quiet_cpu_s": quiet["cpu_s"], "busy_cpu_s": loaded["cpu_s"],
                                "quiet_stages": quiet["stages"], "busy_stages": loaded["stages"]})
        log(f"| {label} | {quiet['wall_s']:.1f} | {loaded['wall_s']:.1f} | {loaded['wall_s'] / quiet['wall_s']:.2f} "
            f"| {quiet['cpu_s']:.1f} / {loaded['cpu_s']:.1f} |")
    figures["load_average_at_end"] = os.getloadavg()[0]
    log(f"load average {figures['load_average_at_end']:.1f} (1 min) at the end")
    return figures
