"""Benchmark: IWAE-k throughput against the machine's matmul throughput, and memory against k.

FLOPs counted: the decoder's matrix multiplications, 2 * fan_in * fan_out per Linear layer per
(sample, datapoint) row, and the multiply-adds of its (transposed) convolutions; elementwise work
(activations, the likelihood, log-sum-exp) is real cost but not counted, so the ratio is a lower
bound on how well the matmul units are used.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import resource
import time
from typing import Callable

import torch
from torch import nn

from gapbench.runner.run import open_run
from gapbench.measure import amortized_posterior
from gapbench.estimators import iwae


def decoder_flops_per_row(decoder: nn.Module) -> int:
    """FLOPs of one forward pass of one z: 2 * in * out per Linear layer, and 2 multiply-adds per
    weight use of each convolution (Conv2d: 2 (C_in / groups) k_h k_w per output value;
    ConvTranspose2d: 2 (C_out / groups) k_h k_w per input value), counted by hooks on a pass of z = 0."""
    flops = [0]

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            flops[0] += 2 * module.in_features * module.out_features * (output.numel() // output.shape[-1])
        elif isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            flops[0] += 2 * module.in_channels // module.groups * k * output.numel()
        elif isinstance(module, nn.ConvTranspose2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            flops[0] += 2 * module.out_channels // module.groups * k * inputs[0].numel()

    hooks = [m.register_forward_hook(count) for m in decoder.modules()
             if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]
    try:
        with torch.no_grad():
            decoder.logits(torch.zeros(1, 1, decoder.latent_size))  # one row: (K, B, Z) = (1, 1, Z)
    finally:
        for hook in hooks:
            hook.remove()
    return flops[0]


def matmul_gflops(size: int = 4096, repeats: int = 3) -> float:
    """Best-of-``repeats`` GFLOP/s of a plain float32 (size x size) @ (size x size) matmul."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: now, VmHWM: peak since start or last reset)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _peak_rss_worker(run_dir: str, num_datapoints: int, num_samples: int, chunk_size: int | None, queue) -> None:
    _, decoder, encoder, x = open_run(run_dir, num_datapoints=num_datapoints)
    q = amortized_posterior(encoder, x)
    gc.collect()
    try:  # Linux: writing 5 to clear_refs resets the peak (VmHWM) to the current resident size
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        baseline, peak_field = _status_kib("VmRSS"), "VmHWM"
    except OSError:  # no reset: the peak includes loading the data, an upper bound on the growth
        baseline, peak_field = _status_kib("VmRSS"), None
    iwae(decoder, q, x, num_samples=num_samples, chunk_size=chunk_size, generator=torch.Generator().manual_seed(0))
    peak = _status_kib(peak_field) if peak_field else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((baseline, peak, peak_field is not None))


def peak_memory_mib(run_dir: str, *, num_datapoints: int, num_samples: int, chunk_size: int | None) -> dict:
    """Resident memory of a fresh process before IWAE-k and at its peak during it (MiB)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_worker, args=(run_dir, num_datapoints, num_samples, chunk_size, queue))
    proc.start()
    baseline, peak, is_reset = queue.get()
    proc.join()
    return {"k": num_samples, "rss_before_mib": baseline / 1024, "peak_mib": peak / 1024,
            "growth_mib": (peak - baseline) / 1024, "peak_reset": is_reset}


def bench_iwae(run_dir: str, *, num_datapoints: int = 1000, num_samples: int = 5000,
               chunk_size: int | None = None, memory_ks: tuple[int, ...] = (500, 5000, 50000),
               memory_datapoints: int = 100, log: Callable[[str], None] = print) -> dict:
    """Time IWAE-``num_samples`` on ``num_datapoints`` datapoints and measure memory against k."""
    config, decoder, encoder, x = open_run(run_dir, num_datapoints=num_datapoints)
    q = amortized_posterior(encoder, x)
    log(f"run {run_dir}: {config.data.dataset}, {x.shape[0]} datapoints, D = {x.shape[1]}; "
        f"{torch.get_num_threads()} threads")
    iwae(decoder, amortized_posterior(encoder, x[:10]), x[:10], num_samples=100,
         generator=torch.Generator().manual_seed(0))  # warm-up
    start = time.perf_counter()
    iwae(decoder, q, x, num_samples=num_samples, chunk_size=chunk_size, generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - start
    flops = decoder_flops_per_row(decoder) * num_samples * x.shape[0]
    achieved = flops / seconds / 1e9
    reference = matmul_gflops()
    memory = [peak_memory_mib(run_dir, num_datapoints=memory_datapoints, num_samples=k, chunk_size=chunk_size)
              for k in memory_ks]
    figures = {
        "num_datapoints": x.shape[0], "k": num_samples, "chunk_size": chunk_size,
        "threads": torch.get_num_threads(), "seconds": seconds, "decoder_gflop": flops / 1e9,
        "gflops": achieved, "matmul_gflops": reference, "fraction_of_matmul": achieved / reference,
        "memory": memory, "memory_datapoints": memory_datapoints,
    }
    log("")
    log(f"IWAE-{num_samples} on {x.shape[0]} datapoints: {seconds:.1f} s, {flops / 1e9:.0f} GFLOP of decoder "
        f"matmuls, {achieved:.1f} GFLOP/s = {achieved / reference:.0%} of a 4096^2 matmul's {reference:.1f} GFLOP/s")
    log(f"peak memory of a fresh process, IWAE-k on {memory_datapoints} datapoints:")
    log("| k | resident before (MiB) | peak during (MiB) | growth (MiB) |")
    log("|---:|---:|---:|---:|")
    for row in memory:
        log(f"| {row['k']} | {row['rss_before_mib']:.0f} | {row['peak_mib']:.0f} | {row['growth_mib']:.0f} |")
    return figures


