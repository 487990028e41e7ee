"""The ``gapbench`` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gapbench.commands.arguments import positive_int
from gapbench.errors import ConfigError, GapbenchError

EXIT_MOVED = 1  # gapbench check: a number moved beyond chance
EXIT_USAGE = 2  # bad input: the message names the problem and the fix
EXIT_STOPPED = 3  # gapbench run: stopped at the time limit or by SIGTERM; the same command continues
EXIT_ALL_FAULTY = 4  # run: every datapoint had a numerical fault, so the table has no numbers
EXIT_INTERRUPTED = 130  # Ctrl-C
TIME_LIMIT_ENV = "GAPBENCH_TIME_LIMIT"  # the default of gapbench run --time-limit


def check_writable(path: str) -> None:
    """Refuse (exit 2) an --out file that cannot be written, before anything is computed: a
    temporary file is made (and removed) beside it."""
    import tempfile

    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name, e.g. {out / 'out.csv'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise ConfigError(f"cannot write --out {out}: {error.strerror or error}; choose a writable path") from None


def _run(args: argparse.Namespace) -> int:
    from gapbench.deadline import Deadline
    from gapbench.runner.device import resolve_device
    from gapbench.runner.distributed import close_ranks, init_ranks, ranks_from_env
    from gapbench.runner.run import run_experiment
    from gapbench.report import gap_table_markdown
    from gapbench.runner.sweep import aggregate, aggregate_markdown, expand, write_index

    points = expand(args.experiment, args.set)  # one point unless the file has a [sweep] table
    ranks = ranks_from_env()  # set by torchrun; one rank otherwise
    device = resolve_device(args.device, local_rank=ranks.local_rank)
    out = Path(args.out) if args.out else Path("runs") / points[0].config.name
    deadline = Deadline(args.time_limit)  # the clock starts before the first stage of the first run
    init_ranks(ranks, device)  # once for every run of a sweep
    all_faulty = False
    try:
        for point in points:
            folder = out / point.label if point.label else out
            if point.label and ranks.is_main:
                print(f"\n== {point.label} ({folder})", file=sys.stderr)
            summary = run_experiment(point.config, folder, force=args.force, progress=not args.quiet,
                                     log=lambda m: print(m, file=sys.stderr), device=device, ranks=ranks,
                                     threads=args.threads, figures=not args.no_figures,
                                     deadline=deadline)
            if summary is None:  # not rank 0: rank 0 wrote the folder and prints the table
                continue
            s = summary["settings"]
            print(f"\n{point.config.name}{' ' + point.label if point.label else ''}: {s['dataset']}, "
                  f"{s['num_datapoints']} {s['split']} datapoints, k = {s['num_samples']['iwae_k']}\n")
            print(gap_table_markdown(summary))
            print(f"run folder: {folder}")
            faults = summary.get("faults", {})
            if faults.get("num_datapoints") and faults.get("num_faulty") == faults.get("num_datapoints"):
                print(f"gapbench: every one of the {faults['num_datapoints']} datapoints of {folder} had a numerical "
                      f"fault ({faults.get('counts')}), so no bound or gap could be estimated; see datapoints.csv, "
                      "column fault", file=sys.stderr)
                all_faulty = True
    except BaseException:
        close_ranks(ranks, wait=False)
        raise
    close_ranks(ranks)
    if len(points) > 1 and ranks.is_main:
        write_index(out, args.experiment, points)
        print(f"\nsweep of {len(points)} runs in {out}; mean over seeds ± standard error, standard deviation:\n")
        print(aggregate_markdown(aggregate([out / p.label for p in points])))
    return EXIT_ALL_FAULTY if all_faulty else 0


def _aggregate(args: argparse.Namespace) -> int:
    from gapbench import io
    from gapbench.runner.sweep import aggregate, aggregate_markdown, run_folders

    if args.out:
        check_writable(args.out)
    table = aggregate(run_folders(args.run_dirs))
    print(aggregate_markdown(table))
    if args.out:
        io.write_csv(Path(args.out), table)
        print(f"aggregate written to {args.out}", file=sys.stderr)
    return 0


def _check(args: argparse.Namespace) -> int:
    import json

    from gapbench import io
    from gapbench.commands.check import CheckError, compare, format_table, make_baseline, read_summary, z_threshold

    z_threshold(args.alpha, 1)  # refuse a bad --alpha before reading anything
    run = read_summary(args.run_dir)
    baseline_path = Path(args.baseline)
    if args.update:
        config_path = Path(args.run_dir) / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else None
        try:
            io.write_json(baseline_path, make_baseline(run, config=config))
        except OSError as error:
            raise CheckError(f"cannot write the baseline {baseline_path}: {error.strerror}; "
                             "choose a writable path") from None
        print(f"baseline written: {baseline_path} (from {args.run_dir})")
        return 0
    if not baseline_path.exists():
        raise CheckError(f"the baseline {baseline_path} does not exist; make it from a run you trust with "
                         f"gapbench check RUN_DIR --baseline {baseline_path} --update")
    result = compare(run, read_summary(baseline_path), alpha=args.alpha, min_difference=args.min_difference)
    print(f"{args.run_dir} against {baseline_path}: two-sided z-test of each difference on both runs' "
          f"Monte Carlo standard errors; with Bonferroni over {len(result.rows)} quantities at "
          f"alpha = {result.alpha:g}, |z| > {result.z_threshold:.2f} counts as moved"
          + (f" (and |difference| > {args.min_difference:g} nats)" if args.min_difference else "") + "\n")
    print(format_table(result))
    for note in result.notes:
        print(f"note: {note}")
    moved = [row.quantity for row in result.rows if row.is_moved]
    if result.is_moved:
        print(f"FAIL: {', '.join(moved) or 'see the notes'} moved beyond chance; if the change is intended, "
              f"regenerate the baseline with --update")
        return EXIT_MOVED
    print("PASS: nothing moved beyond chance")
    return 0


def _bdmc(args: argparse.Namespace) -> int:
    from gapbench import io
    from gapbench.runner.run import open_run_config
    from gapbench.commands.bdmc import bdmc_run, bdmc_table

    if args.out:  # before the computation, so that its result is not lost
        check_writable(args.out)
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


def _track(args: argparse.Namespace) -> int:
    from gapbench.report.figures.track import track_figure
    from gapbench.commands.track import track

    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr))
    frame = track(args.run_dir, num_datapoints=args.num_datapoints, num_samples=args.num_samples,
                  progress=not args.quiet, log=log)
    paths = track_figure(frame, Path(args.run_dir) / "gaps_over_training")
    wide = frame.pivot_table(index="epoch", columns=["split", "quantity"], values="mean")
    columns = [(s, q) for q in ("elbo_q", "elbo_q_star", "log_px", "amortization") for s in ("train", "valid")]
    print(wide[columns].round(3).to_string())
    print(f"written: {Path(args.run_dir) / 'track.csv'}, " + ", ".join(map(str, paths)), file=sys.stderr)
    return 0


def _report(args: argparse.Namespace) -> int:
    from gapbench.report.build import make_report

    text, written = make_report(args.runs, args.out, compare=args.compare, transcription=args.transcription,
                                figures=not args.no_figures)
    print(text)
    if written:
        print("written: " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def _config_reference(args: argparse.Namespace) -> int:
    from gapbench.runner.config_reference import reference_markdown, update_file

    if args.update:
        changed = update_file(args.update)
        print(f"{args.update}: the config table is {'rewritten' if changed else 'already up to date'}", file=sys.stderr)
        return 0
    print(reference_markdown(), end="")
    return 0


def _duration(text: str) -> float:
    from gapbench.deadline import parse_duration
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error} (--time-limit or {TIME_LIMIT_ENV})") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gapbench",
        description="Measure the approximation and amortization gaps of amortized inference "
                    "(Cremer, Li & Duvenaud, 2018).")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train (or load), refine, estimate and report one experiment (every run of "
                                     "its [sweep]); under torchrun the evaluation is sharded over the processes")
    run.add_argument("experiment", help="experiment TOML file, e.g. experiments/digits.toml")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    run.add_argument("--out", help="run folder (default: runs/<name>)")
    run.add_argument("--force", action="store_true",
                     help="reuse a folder that holds a run with another config: redo only the stages the change "
                          "affects (and those after them), keep the others")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--threads", type=positive_int, metavar="N",
                     help="torch threads of every stage (default: 1, or more for a stage whose steps are large "
                          "enough to gain from them; printed per stage)")
    run.add_argument("--no-figures", action="store_true",
                     help="the report stage writes no figures (figures/ in the run folder)")
    run.add_argument("--time-limit", type=_duration, default=os.environ.get(TIME_LIMIT_ENV) or None, metavar="DURATION",
                     help="stop at a safe point before this wall-clock time (90s, 45m, 2h30m; default: the "
                          f"environment variable {TIME_LIMIT_ENV}, else none), save, and exit with code 3; "
                          "the same command continues. SIGTERM stops the same way")
    run.add_argument("--device", default="cpu", metavar="cpu|cuda|auto",
                     help="where every stage runs: cpu (default), cuda (cuda:N; under torchrun each process takes "
                          "the GPU of its LOCAL_RANK) or auto (cuda when PyTorch finds a GPU)")
    run.set_defaults(func=_run)
    agg = sub.add_parser("aggregate", help="mean and spread over seeds of the bounds and gaps of several runs "
                                           "(a sweep folder, or run folders)")
    agg.add_argument("run_dirs", nargs="+", metavar="DIR",
                     help="run folders, or a sweep folder (its sub-folders with summary.json)")
    agg.add_argument("--out", help="also write the table as CSV here")
    agg.set_defaults(func=_aggregate)
    check = sub.add_parser("check", help="compare a run's bounds and gaps with a baseline; exit 1 when one "
                                         "moved beyond chance")
    check.add_argument("run_dir", help="a finished run folder (or its summary.json)")
    check.add_argument("--baseline", required=True, help="baseline JSON, e.g. results/baselines/ci_quick.json")
    check.add_argument("--update", action="store_true", help="write the run's numbers as the new baseline")
    check.add_argument("--alpha", type=float, default=0.01,
                       help="family-wise false-alarm rate of the test (default 0.01)")
    check.add_argument("--min-difference", type=float, default=0.0, metavar="NATS",
                       help="never flag a difference of at most this many nats (default 0)")
    check.set_defaults(func=_check)
    bd = sub.add_parser("bdmc", help="BDMC sandwich on data simulated from a trained run's model: how far AIS "
                                     "at the run's settings can be from log p(x)")
    bd.add_argument("run_dir", help="a trained run folder (gapbench run ... --out RUN_DIR)")
    bd.add_argument("--num-datapoints", type=positive_int, default=100, help="datapoints to simulate (default 100)")
    bd.add_argument("--num-chains", type=positive_int, help="AIS chains per datapoint (default: the run's ais.num_chains)")
    bd.add_argument("--num-steps", type=positive_int, help="annealing steps (default: the run's ais.num_steps)")
    bd.add_argument("--schedule", choices=["linear", "sigmoid"], help="default: the run's ais.schedule")
    bd.add_argument("--num-leapfrog", type=positive_int, help="default: the run's ais.num_leapfrog")
    bd.add_argument("--init", choices=["prior", "encoder"],
                    help="initial distribution (default: the run's ais.init; q_star becomes encoder)")
    bd.add_argument("--seed", type=int, default=0)
    bd.add_argument("--out", help="also write the per-datapoint bounds as CSV here")
    bd.add_argument("--quiet", action="store_true", help="no progress bar")
    bd.set_defaults(func=_bdmc)
    table = sub.add_parser("table", help="the cross-family gap table (Cremer et al., 2018, Table 2) of finished runs")
    table.add_argument("runs", nargs="+", metavar="RUN_DIR",
                       help="run folders, e.g. one trained with an FFG encoder and one with a flow")
    table.add_argument("--out", help="also write gap_table.md, gap_table.csv and gap_table.tex here")
    table.set_defaults(func=_report, compare=None, transcription=None, no_figures=True)  # gapbench report's tables alone
    tr = sub.add_parser("track", help="gaps over training: bounds and gaps of every training snapshot on training "
                                      "and validation datapoints (needs train.snapshot_every)")
    tr.add_argument("run_dir", help="a run trained with train.snapshot_every = N")
    tr.add_argument("--num-datapoints", type=positive_int, default=100, help="first N of each split (default 100)")
    tr.add_argument("--num-samples", type=positive_int, default=1000, help="samples for every ELBO and IWAE (default 1000)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=_track)
    report = sub.add_parser("report", help="the cross-family table of finished runs, beside a published table "
                                           "(--compare), with figures")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished run folders")
    report.add_argument("--compare", metavar="PAPER_TABLE",
                        help="a published table, e.g. results/published/cremer2018_table2.json")
    report.add_argument("--transcription", metavar="NAME",
                        help="compare with this transcription of the published table only (default: every one, "
                             "each shown by name where they disagree)")
    report.add_argument("--out", help="write gap_table.{md,csv,tex}, comparison.{md,csv} and the figures "
                                      "(gap_bars, gap_distributions, gap_scatter; PNG and PDF) here")
    report.add_argument("--no-figures", action="store_true", help="tables only")
    report.set_defaults(func=_report)
    reference = sub.add_parser("config-reference", help="the table of every config key with its default and meaning "
                                                         "(Markdown, made from the config's field descriptions)")
    reference.add_argument("--update", metavar="README.md",
                           help="rewrite the table between the config-reference markers of this file instead")
    reference.set_defaults(func=_config_reference)
    from gapbench.commands.figure import add_figure_parser
    add_figure_parser(sub)
    from gapbench.bench import add_bench_parser
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from gapbench.deadline import StopRequested

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StopRequested as stop:
        print(f"gapbench: {stop}", file=sys.stderr)
        return EXIT_STOPPED
    except GapbenchError as error:  # bad input: its message names the problem and the fix
        print(f"gapbench: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gapbench: interrupted; finished stages, the last saved training epoch and the finished units of "
              "datapoints (partial/) are kept, so the same command resumes", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
