"""The ``gapbench`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2


def _run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .experiment import run_experiment
    from .report import gap_table_markdown

    config = load_config(args.experiment, args.set)
    out = Path(args.out) if args.out else Path("runs") / config.name
    summary = run_experiment(config, out, force=args.force, progress=not args.quiet,
                             log=lambda m: print(m, file=sys.stderr))
    n = summary["settings"]["num_datapoints"]
    print(f"\n{config.name}: {summary['settings']['dataset']}, {n} {summary['settings']['split']} datapoints, "
          f"k = {summary['settings']['num_samples']['iwae_k']}\n")
    print(gap_table_markdown(summary))
    print(f"run folder: {out}")
    return 0


def _bdmc(args: argparse.Namespace) -> int:
    from . import io
    from .experiment import open_run_config
    from .sandwich import bdmc_run, bdmc_table

    ais = open_run_config(args.run_dir).ais  # the settings the run's AIS stage uses (defaults if none)
    overrides = {k: getattr(args, k) for k in ("num_chains", "num_steps", "schedule", "num_leapfrog")
                 if getattr(args, k) is not None}
    procedure = ais.procedure()._replace(**overrides)
    init = args.init or ("encoder" if ais.init == "q_star" else ais.init)
    frame, summary = bdmc_run(args.run_dir, num_datapoints=args.num_datapoints, procedure=procedure, init=init,
                              seed=args.seed, progress=not args.quiet)
    print(bdmc_table(summary))
    if args.out:
        io.write_csv(Path(args.out), frame)
        print(f"per-datapoint bounds written to {args.out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gapbench",
        description="Measure the approximation and amortization gaps of amortized inference "
                    "(Cremer, Li & Duvenaud, 2018).")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train (or load), refine, estimate and report one experiment")
    run.add_argument("experiment", help="experiment TOML file, e.g. experiments/digits.toml")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    run.add_argument("--out", help="run folder (default: runs/<name>)")
    run.add_argument("--force", action="store_true", help="redo every stage, even in a folder with another config")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=_run)
    bd = sub.add_parser("bdmc", help="BDMC sandwich on data simulated from a trained run's model: how far AIS "
                                     "at the run's settings can be from log p(x)")
    bd.add_argument("run_dir", help="a trained run folder (gapbench run ... --out RUN_DIR)")
    bd.add_argument("--num-datapoints", type=int, default=100, help="datapoints to simulate (default 100)")
    bd.add_argument("--num-chains", type=int, help="AIS chains per datapoint (default: the run's ais.num_chains)")
    bd.add_argument("--num-steps", type=int, help="annealing steps (default: the run's ais.num_steps)")
    bd.add_argument("--schedule", choices=["linear", "sigmoid"], help="default: the run's ais.schedule")
    bd.add_argument("--num-leapfrog", type=int, help="default: the run's ais.num_leapfrog")
    bd.add_argument("--init", choices=["prior", "encoder"],
                    help="initial distribution (default: the run's ais.init; q_star becomes encoder)")
    bd.add_argument("--seed", type=int, default=0)
    bd.add_argument("--out", help="also write the per-datapoint bounds as CSV here")
    bd.add_argument("--quiet", action="store_true", help="no progress bar")
    bd.set_defaults(func=_bdmc)
    from .bench import add_bench_parser
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .data import DataError
    from .experiment import RunError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, RunError) as error:
        print(f"gapbench: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
