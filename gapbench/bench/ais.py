"""Benchmark: AIS throughput, its share of the machine's matmul throughput, and memory against steps.

Throughput is counted in datapoint-chain-transitions per second: one HMC transition of one chain of
one datapoint. FLOPs counted: the decoder's matrix multiplications in the gradient evaluations of
log f_beta(z) = log p(z) + beta log p(x|z); a gradient evaluation is a forward pass (2 * fan_in *
fan_out per Linear layer per row) and a backward pass to z only (the parameters are frozen, so no
weight gradients: the same count again). A transition with L leapfrog steps makes L + 1 of them
(the extra one re-evaluates the state at the new temperature). Elementwise work is real cost but is
not counted, so the share is a lower bound on how well the matmul units are used.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import time
from typing import Callable

import torch

from gapbench.estimators import AISProcedure, ais
from gapbench.estimators.ais import chains_per_chunk
from gapbench.estimators.hmc import value_and_grad
from gapbench.runner.run import open_run
from gapbench.measure import frozen
from gapbench.bench.iwae import _status_kib, decoder_flops_per_row, matmul_gflops


def gradient_gflops(decoder, x: torch.Tensor, *, num_chains: int, chunk_size: int | None,
                    repeats: int = 3) -> tuple[float, float]:
    """Best-of-``repeats`` seconds and GFLOP/s of one gradient evaluation of the tempered density
    for (C, B, Z) chains, the unit of work of HMC, ``chunk_size`` chains at a time."""
    z = torch.randn(num_chains, x.shape[0], decoder.latent_size, generator=torch.Generator().manual_seed(0))

    def logdensity_fn(v: torch.Tensor) -> torch.Tensor:
        return decoder.log_prior(v) + 0.5 * decoder.log_likelihood(x, v)  # (C, B)

    flops = 2 * decoder_flops_per_row(decoder) * num_chains * x.shape[0]
    with frozen(decoder):
        value_and_grad(logdensity_fn, z, chunk_size=chunk_size)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            value_and_grad(logdensity_fn, z, chunk_size=chunk_size)
            best = min(best, time.perf_counter() - start)
    return best, flops / best / 1e9


def _rss_worker(run_dir: str, num_datapoints: int, num_chains: int, num_steps: int, record_every: int,
                queue) -> None:
    """In a fresh process: resident memory (KiB) before AIS and at every ``record_every`` steps."""
    _, decoder, _, x = open_run(run_dir, num_datapoints=num_datapoints)
    gc.collect()
    before = _status_kib("VmRSS")
    trace: list[tuple[int, int]] = []

    def record(t: int) -> None:
        if t % record_every == 0:
            trace.append((t, _status_kib("VmRSS")))

    with frozen(decoder):
        ais(decoder, x, procedure=AISProcedure(num_chains=num_chains, num_steps=num_steps),
            generator=torch.Generator().manual_seed(0), callback=record)
    queue.put((before, trace, _status_kib("VmHWM")))


def memory_trace(run_dir: str, *, num_datapoints: int, num_chains: int, num_steps: int,
                 record_every: int) -> dict:
    """Resident memory of a fresh process during AIS, every ``record_every`` steps (MiB)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_rss_worker, args=(run_dir, num_datapoints, num_chains, num_steps, record_every, queue))
    proc.start()
    before, trace, peak = queue.get()
    proc.join()
    return {"rss_before_mib": before / 1024, "peak_mib": peak / 1024,
            "rss_by_step_mib": [(t, kib / 1024) for t, kib in trace]}


def _reset_peak() -> bool:
    """Reset this process's peak resident size (VmHWM) to the current one (Linux); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def bench_ais(run_dir: str, *, num_datapoints: int = 1000, num_chains: int = 16, num_steps: int = 21,
              num_leapfrog: int = 10, memory_steps: int = 200, memory_datapoints: int = 100,
              matmul_size: int = 4096, log: Callable[[str], None] = print) -> dict:
    """Time ``num_steps - 1`` AIS transitions on ``num_datapoints`` x ``num_chains`` chains (with the
    peak resident memory they add), and trace resident memory over ``memory_steps`` steps of
    ``memory_datapoints`` x ``num_chains`` chains in a fresh process."""
    config, decoder, _, x = open_run(run_dir, num_datapoints=num_datapoints)
    rows = num_chains * x.shape[0]
    log(f"run {run_dir}: {config.data.dataset}, {x.shape[0]} datapoints x {num_chains} chains, D = {x.shape[1]}, "
        f"Z = {decoder.latent_size}, decoder hidden {config.model.decoder_hidden}; {torch.get_num_threads()} threads")
    procedure = AISProcedure(num_chains=num_chains, num_steps=num_steps, num_leapfrog=num_leapfrog)
    with frozen(decoder):
        ais(decoder, x[:10], procedure=procedure._replace(num_steps=3),
            generator=torch.Generator().manual_seed(0))  # warm-up
        gc.collect()
        is_reset = _reset_peak()
        rss_before = _status_kib("VmRSS")
        start = time.perf_counter()
        estimate = ais(decoder, x, procedure=procedure, generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
        peak = _status_kib("VmHWM")
    num_transitions = num_steps - 1
    num_gradients = num_steps + num_transitions * num_leapfrog  # one per step, L per transition
    flops = 2 * decoder_flops_per_row(decoder) * rows * num_gradients
    achieved = flops / seconds / 1e9
    chunk = chains_per_chunk(x.shape[0])
    grad_seconds, grad_gflops = gradient_gflops(decoder, x, num_chains=num_chains, chunk_size=chunk)
    _, whole_gflops = gradient_gflops(decoder, x, num_chains=num_chains, chunk_size=None)
    reference = matmul_gflops(matmul_size)
    memory = memory_trace(run_dir, num_datapoints=memory_datapoints, num_chains=num_chains, num_steps=memory_steps,
                          record_every=max(1, memory_steps // 10))
    rss = [m for _, m in memory["rss_by_step_mib"]]
    figures = {
        "num_datapoints": x.shape[0], "num_chains": num_chains, "num_steps": num_steps,
        "num_transitions": num_transitions, "num_leapfrog": num_leapfrog, "threads": torch.get_num_threads(),
        "seconds": seconds, "transitions_per_second": rows * num_transitions / seconds,
        "gradient_evaluations": num_gradients, "decoder_gflop": flops / 1e9, "gflops": achieved,
        "chains_per_chunk": chunk, "gradient_seconds": grad_seconds, "gradient_gflops": grad_gflops,
        "unchunked_gradient_gflops": whole_gflops, "matmul_gflops": reference,
        "fraction_of_matmul": achieved / reference, "gradient_fraction_of_matmul": grad_gflops / reference,
        "mean_acceptance_rate": float(estimate.acceptance_rate.mean()),
        "rss_before_mib": rss_before / 1024, "peak_mib": peak / 1024, "peak_growth_mib": (peak - rss_before) / 1024,
        "peak_reset": is_reset, "memory": memory, "memory_datapoints": memory_datapoints, "memory_steps": memory_steps,
        "memory_last_minus_first_record_mib": rss[-1] - rss[0] if rss else float("nan"),
        "memory_range_of_records_mib": max(rss) - min(rss) if rss else float("nan"),
    }
    log("")
    log(f"AIS, {x.shape[0]} datapoints x {num_chains} chains, {num_transitions} HMC transitions of "
        f"{num_leapfrog} leapfrog steps: {seconds:.1f} s, "
        f"{figures['transitions_per_second']:.0f} datapoint-chain-transitions/s")
    log(f"decoder matmuls: {flops / 1e9:.0f} GFLOP in {num_gradients} gradient evaluations, {achieved:.1f} GFLOP/s "
        f"= {achieved / reference:.0%} of a {matmul_size}^2 matmul's {reference:.1f} GFLOP/s")
    log(f"one gradient evaluation alone ({rows} rows, {chunk} chains per chunk as in AIS): {grad_seconds * 1e3:.0f} ms, "
        f"{grad_gflops:.1f} GFLOP/s = {grad_gflops / reference:.0%} of the matmul; in one piece: {whole_gflops:.1f} "
        f"GFLOP/s = {whole_gflops / reference:.0%}")
    log(f"resident memory during the timed run: {rss_before / 1024:.0f} MiB before, peak {peak / 1024:.0f} MiB "
        f"(+{(peak - rss_before) / 1024:.0f} MiB{'' if is_reset else '; peak not resettable, includes loading'})")
    log(f"resident memory of a fresh process, {memory_datapoints} datapoints x {num_chains} chains, "
        f"{memory_steps} steps: {memory['rss_before_mib']:.0f} MiB before, peak {memory['peak_mib']:.0f} MiB")
    log("| step | resident (MiB) |")
    log("|---:|---:|")
    for t, mib in memory["rss_by_step_mib"]:
        log(f"| {t} | {mib:.0f} |")
    log(f"last record minus first: {figures['memory_last_minus_first_record_mib']:+.1f} MiB; range of the records: "
        f"{figures['memory_range_of_records_mib']:.1f} MiB")
    return figures
