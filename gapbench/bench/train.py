"""Benchmark: seconds per training epoch against the matmul floor of the same network, per Adam implementation.

For one experiment (or a run folder's config) it trains fresh networks for one epoch at a time with
``gapbench.train.train`` itself, alternating the implementations round by round so that a change in
the machine's load hits them alike, and reports the median seconds per epoch of each and the ratios.

FLOPs counted per datapoint: forward 2 * fan_in * fan_out per Linear layer of encoder and decoder
(one z per datapoint, as in training), backward twice that (gradients of inputs and of weights) less
the input gradient of the first layer, whose input is the data. The floor is the time of exactly
those matrix products at the same shapes (batch ``train.batch_size``), timed in the same process, so
``share_of_matmul_peak`` = floor / epoch time says how much of an epoch is spent elsewhere
(activations, sampling, the likelihood, Adam, Python).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from gapbench.runner.config import ExperimentConfig, load_config
from gapbench.data import binarize, load_dataset
from gapbench.runner.run import networks_for, open_run_config, stage_generator
from gapbench.train import ADAM_IMPLEMENTATIONS, negative_elbo, train


def load_source(source: str | Path) -> ExperimentConfig:
    """The config of a run folder or of an experiment TOML file."""
    path = Path(source)
    return open_run_config(path) if path.is_dir() else load_config(path)


def linear_shapes(decoder: nn.Module, encoder: nn.Module, x: torch.Tensor) -> list[tuple[int, int, bool]]:
    """(fan_in, fan_out, input needs a gradient) of every Linear layer a training step runs, in order."""
    shapes = []

    def record(module, inputs, output) -> None:
        shapes.append((module.in_features, module.out_features, inputs[0].requires_grad))
    hooks = [m.register_forward_hook(record) for net in (encoder, decoder) for m in net.modules()
             if isinstance(m, nn.Linear)]
    try:
        negative_elbo(decoder, encoder, x, beta=1.0, generator=torch.Generator().manual_seed(0))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def step_flops(shapes: list[tuple[int, int, bool]], batch_size: int) -> int:
    """Forward and backward matmul FLOPs of one step of ``batch_size`` datapoints."""
    forward = sum(2 * i * o for i, o, _ in shapes)
    backward = sum(2 * i * o * (2 if needs_grad else 1) for i, o, needs_grad in shapes)
    return batch_size * (forward + backward)


def matmul_seconds(shapes: list[tuple[int, int, bool]], batch_size: int, *, repeats: int = 200) -> float:
    """Seconds of the step's matrix products alone (forward, input and weight gradients), best of 5."""
    generator = torch.Generator().manual_seed(0)
    products = []
    for i, o, needs_grad in shapes:
        products.append((torch.randn(batch_size, i, generator=generator), torch.randn(i, o, generator=generator)))
        products.append((torch.randn(o, batch_size, generator=generator), torch.randn(batch_size, i, generator=generator)))
        if needs_grad:
            products.append((torch.randn(batch_size, o, generator=generator), torch.randn(o, i, generator=generator)))
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            for a, b in products:
                torch.mm(a, b)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def bench_train(source: str | Path, *, implementations: tuple[str, ...] = ("for-loop", "fused"),
                rounds: int = 3, num_train: int | None = None, threads: int = 1) -> dict:
    """Median seconds per epoch of each Adam implementation over ``rounds`` alternating epochs (each from
    fresh networks), the matmul floor and the ratios; prints a table and returns the figures."""
    torch.set_num_threads(threads)
    config = load_source(source)
    d, t = config.data, config.train
    dataset = load_dataset(d.dataset, data_dir=d.data_dir, download=d.download, bits=d.bits)
    train_x = dataset.train if num_train is None else dataset.train[:num_train]
    valid_x = dataset.valid[:100]  # the epoch's validation pass, kept small
    decoder, encoder = networks_for(config, dataset)
    probe = binarize(train_x[:t.batch_size], mode="static", threshold=0.5)
    shapes = linear_shapes(decoder, encoder, probe)
    num_batches = math.ceil(train_x.shape[0] / t.batch_size)
    flops = step_flops(shapes, t.batch_size) * num_batches
    seconds: dict[str, list[float]] = {name: [] for name in implementations}
    for _ in range(rounds):
        for name in implementations:
            decoder, encoder = networks_for(config, dataset)
            result = train(decoder, encoder, train_x, valid_x, epochs=1, batch_size=t.batch_size,
                           learning_rate=t.learning_rate, adam_eps=t.adam_eps, warmup_epochs=t.warmup_epochs,
                           schedule=t.schedule, binarization=d.binarization, threshold=d.threshold,
                           valid_every=1, valid_num_samples=1, early_stopping_patience=0,
                           generator=stage_generator(config.seed, "train"), progress=False, adam=name)
            seconds[name].append(result.history[0].seconds)
    floor = matmul_seconds(shapes, t.batch_size) * num_batches
    scale = dataset.train.shape[0] / train_x.shape[0]  # per epoch of the whole training split
    epochs = {name: statistics.median(s) * scale for name, s in seconds.items()}
    reference = epochs[implementations[0]]
    figures = {
        "experiment": config.name, "dataset": dataset.name, "train_datapoints": int(dataset.train.shape[0]),
        "timed_datapoints": int(train_x.shape[0]), "batch_size": t.batch_size, "threads": threads,
        "layers": [list(s) for s in shapes], "gflop_per_epoch": flops * scale / 1e9,
        "matmul_gflops_per_second": flops / floor / 1e9, "matmul_floor_seconds_per_epoch": floor * scale,
        "seconds_per_epoch": epochs, "all_seconds_per_epoch": {k: [v * scale for v in s] for k, s in seconds.items()},
        "speedup_over_" + implementations[0]: {name: reference / s for name, s in epochs.items()},
        "share_of_matmul_peak": {name: floor * scale / s for name, s in epochs.items()},
    }
    print(f"{config.name}: {dataset.name}, {dataset.train.shape[0]} training datapoints in batches of {t.batch_size}, "
          f"{threads} thread(s); layers (in, out): {[s[:2] for s in shapes]}")
    print(f"matmul floor: {figures['gflop_per_epoch']:.1f} GFLOP per epoch (forward + backward) at "
          f"{figures['matmul_gflops_per_second']:.1f} GFLOP/s (the same matrix products alone) = "
          f"{figures['matmul_floor_seconds_per_epoch']:.2f} s per epoch")
    print(f"{'Adam':>10}  {'s/epoch':>8}  {'speed-up':>8}  {'share of matmul peak':>20}  (median of {rounds} "
          "alternating epochs)")
    for name in implementations:
        print(f"{name:>10}  {epochs[name]:8.2f}  {reference / epochs[name]:7.2f}x  "
              f"{figures['share_of_matmul_peak'][name]:19.0%}")
    return figures


__all__ = ["ADAM_IMPLEMENTATIONS", "bench_train", "step_flops"]
