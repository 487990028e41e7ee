"""Benchmarks that print figures (``gapbench bench ...``); never timed tests."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _write(figures: dict, out: str | None) -> None:
    if out:
        from gapbench import io
        io.write_json(Path(out), figures)
        print(f"figures written to {out}", file=sys.stderr)


def _set_threads(args: argparse.Namespace) -> None:
    """``--threads N``: torch threads of the timed code (default: torch's choice, as before)."""
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)


def _refine(args: argparse.Namespace) -> int:
    from gapbench.bench.refine import bench_refine
    _set_threads(args)
    figures = bench_refine(args.run_dir, num_datapoints=args.num_datapoints,
                           reference_datapoints=args.reference_datapoints, num_samples=args.num_samples,
                           init=args.init)
    _write(figures, args.out)
    return 0


def _refine_flow(args: argparse.Namespace) -> int:
    from gapbench.bench.refine_flow import bench_refine_flow
    _set_threads(args)
    figures = bench_refine_flow(args.run_dir, family=args.family, num_datapoints=args.num_datapoints,
                                reference_datapoints=args.reference_datapoints,
                                paper_datapoints=args.paper_datapoints, num_samples=args.num_samples,
                                init=args.init, num_steps=args.steps, hidden_size=args.hidden)
    _write(figures, args.out)
    return 0


def _iwae(args: argparse.Namespace) -> int:
    from gapbench.bench.iwae import bench_iwae
    _set_threads(args)
    figures = bench_iwae(args.run_dir, num_datapoints=args.num_datapoints, num_samples=args.k,
                         chunk_size=args.chunk_size, memory_ks=tuple(args.memory_k))
    _write(figures, args.out)
    return 0


def _ais(args: argparse.Namespace) -> int:
    from gapbench.bench.ais import bench_ais
    _set_threads(args)
    figures = bench_ais(args.run_dir, num_datapoints=args.num_datapoints, num_chains=args.num_chains,
                        num_steps=args.num_steps, num_leapfrog=args.num_leapfrog, memory_steps=args.memory_steps,
                        memory_datapoints=args.memory_datapoints)
    _write(figures, args.out)
    return 0


def _scale(args: argparse.Namespace) -> int:
    from gapbench.bench.scale import bench_scale
    figures = bench_scale(args.run_dir, num_datapoints=args.num_datapoints, processes=tuple(args.processes),
                          threads=args.threads, device=args.device, overrides=tuple(args.set),
                          stream_datapoints=args.stream_datapoints)
    _write(figures, args.out)
    return 0


def _log_px(args: argparse.Namespace) -> int:
    from gapbench.bench.log_px import bench_linear_gaussian, bench_run, print_figures
    figures = bench_run(args.run_dir) if args.run_dir else bench_linear_gaussian(num_datapoints=args.num_datapoints,
                                                                                 num_samples=args.k)
    print_figures(figures)
    _write(figures, args.out)
    return 0


def _threads(args: argparse.Namespace) -> int:
    from gapbench.bench.threads import bench_threads
    figures = bench_threads(args.experiment, overrides=tuple(args.set), busy=args.busy, job=not args.no_job,
                            steps=not args.no_steps, before=not args.no_before)
    _write(figures, args.out)
    return 0


def _train(args: argparse.Namespace) -> int:
    from gapbench.bench.train import bench_train
    figures = bench_train(args.source, implementations=tuple(args.adam), rounds=args.rounds,
                          num_train=args.num_train, threads=args.threads)
    _write(figures, args.out)
    return 0


def add_bench_parser(sub) -> None:
    from gapbench.commands.arguments import positive_int

    def threads(parser, help="torch threads (default: torch's choice)"):
        parser.add_argument("--threads", type=positive_int, default=None, metavar="N", help=help)
    bench = sub.add_parser("bench", help="speed and memory benchmarks on a trained run (prints figures)")
    kinds = bench.add_subparsers(dest="benchmark", required=True)
    refine = kinds.add_parser("refine", help="local FFG: the paper's loop against gapbench's batched default")
    refine.add_argument("run_dir", help="a trained run folder (gapbench run ... --out RUN_DIR)")
    refine.add_argument("--num-datapoints", type=int, default=1000)
    refine.add_argument("--reference-datapoints", type=int, default=20,
                        help="datapoints for the slow one-at-a-time reference (time scaled per datapoint)")
    refine.add_argument("--num-samples", type=int, default=5000, help="samples for each final L[q*]")
    refine.add_argument("--init", choices=["encoder", "prior"], default=None,
                        help="where gapbench's procedure starts (default: the config default, encoder)")
    threads(refine)
    refine.add_argument("--out", help="also write the figures as JSON here")
    refine.set_defaults(func=_refine)
    flow = kinds.add_parser("refine-flow", help="local flow refinement: batched over datapoints vs one at a time")
    flow.add_argument("run_dir", help="a trained run folder (gapbench run ... --out RUN_DIR)")
    flow.add_argument("--family", choices=["flow", "planar", "iaf"], default="flow")
    flow.add_argument("--num-datapoints", type=int, default=1000)
    flow.add_argument("--reference-datapoints", type=int, default=10,
                      help="datapoints refined one at a time (time scaled per datapoint)")
    flow.add_argument("--paper-datapoints", type=int, default=0,
                      help="also time the paper's procedure one at a time on this many datapoints (slow)")
    flow.add_argument("--num-samples", type=int, default=1000, help="samples for each final L[q*]")
    flow.add_argument("--init", choices=["encoder", "prior"], default=None,
                      help="where refinement starts (default: the config default, encoder)")
    flow.add_argument("--steps", type=int, default=None, help="flow steps (default: the run's model.flow_steps)")
    flow.add_argument("--hidden", type=int, default=None, help="flow width (default: the run's model.flow_hidden)")
    threads(flow)
    flow.add_argument("--out", help="also write the figures as JSON here")
    flow.set_defaults(func=_refine_flow)
    iw = kinds.add_parser("iwae", help="IWAE-k GFLOP/s against a plain matmul, and peak memory against k")
    iw.add_argument("run_dir")
    iw.add_argument("--num-datapoints", type=int, default=1000)
    iw.add_argument("--k", type=int, default=5000)
    iw.add_argument("--chunk-size", type=int, default=None)
    iw.add_argument("--memory-k", type=int, nargs="+", default=[500, 5000, 50000])
    threads(iw)
    iw.add_argument("--out", help="also write the figures as JSON here")
    iw.set_defaults(func=_iwae)
    a = kinds.add_parser("ais", help="AIS throughput (datapoint-chain-transitions/s), share of matmul GFLOP/s, "
                                     "memory against steps")
    a.add_argument("run_dir")
    a.add_argument("--num-datapoints", type=int, default=1000)
    a.add_argument("--num-chains", type=int, default=16)
    a.add_argument("--num-steps", type=int, default=21, help="annealing steps timed (transitions: one fewer)")
    a.add_argument("--num-leapfrog", type=int, default=10)
    a.add_argument("--memory-steps", type=int, default=200, help="steps of the memory trace (fresh process)")
    a.add_argument("--memory-datapoints", type=int, default=100)
    threads(a)
    a.add_argument("--out", help="also write the figures as JSON here")
    a.set_defaults(func=_ais)
    sc = kinds.add_parser("scale", help="full-evaluation throughput (datapoints/s) over 1, 2, ... torchrun processes, "
                                        "scaling efficiency, and the cost of per-datapoint random streams")
    sc.add_argument("run_dir")
    sc.add_argument("--num-datapoints", type=int, default=1000)
    sc.add_argument("--processes", type=int, nargs="*", default=[1, 2],
                    help="process counts to time (default 1 2; none: only the streams' cost)")
    sc.add_argument("--threads", type=positive_int, default=1, metavar="N",
                    help="torch threads per process (default 1)")
    sc.add_argument("--device", default="cpu", help="cpu, cuda or auto (as gapbench run --device)")
    sc.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the timed runs, e.g. --set ais.num_chains=16 (repeatable)")
    sc.add_argument("--stream-datapoints", type=int, default=None,
                    help="datapoints for the streams-against-Generator timing (default: --num-datapoints)")
    sc.add_argument("--out", help="also write the figures as JSON here")
    sc.set_defaults(func=_scale)
    lp = kinds.add_parser("log-px", help="log p_hat(x): bias against exact log p(x) on linear-Gaussian models (no "
                                         "RUN_DIR), or its cost and effect on the approximation gap of a finished run")
    lp.add_argument("run_dir", nargs="?", default=None, help="a finished run folder (optional)")
    lp.add_argument("--num-datapoints", type=int, default=200, help="linear-Gaussian datapoints")
    lp.add_argument("--k", type=int, default=5000, help="IWAE samples on the linear-Gaussian models")
    lp.add_argument("--out", help="also write the figures as JSON here")
    lp.set_defaults(func=_log_px)
    th = kinds.add_parser("threads", help="a decoder step with 1 and 2 torch threads, and the whole job with the "
                                          "cores' threads and with the per-stage choice, quiet and beside busy "
                                          "processes")
    th.add_argument("experiment", help="experiment TOML file, e.g. experiments/digits.toml")
    th.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the timed runs, e.g. --set train.epochs=50 (repeatable)")
    th.add_argument("--busy", type=positive_int, default=2, help="competing busy processes (default 2)")
    th.add_argument("--no-job", action="store_true", help="time the decoder step only")
    th.add_argument("--no-steps", action="store_true", help="time the job only")
    th.add_argument("--no-before", action="store_true",
                    help="time the job with the per-stage choice only (not also with --threads C)")
    th.add_argument("--out", help="also write the figures as JSON here")
    th.set_defaults(func=_threads)
    tr = kinds.add_parser("train", help="seconds per training epoch and share of the matmul peak, per Adam "
                                        "implementation (fresh networks, alternating epochs)")
    tr.add_argument("source", metavar="RUN_DIR_OR_EXPERIMENT", help="a run folder or an experiment TOML file")
    tr.add_argument("--adam", nargs="+", default=["for-loop", "foreach", "fused"],
                    choices=["for-loop", "foreach", "fused"], help="implementations to time; the first is the "
                    "reference of the speed-ups (default: for-loop foreach fused; for-loop is torch's CPU default)")
    tr.add_argument("--rounds", type=int, default=3, help="epochs per implementation, alternating (default 3)")
    tr.add_argument("--num-train", type=int, default=None,
                    help="time epochs of the first N training datapoints, scaled to the whole split")
    tr.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    tr.add_argument("--out", help="also write the figures as JSON here")
    tr.set_defaults(func=_train)


__all__ = ["add_bench_parser"]
