"""``gapbench figure ais|curve|posterior|track``: the figures drawn outside a run's report stage.

Each subcommand reads what its figure needs (a run folder, its summary or track.csv; or, for ``ais``, a
simulated linear-Gaussian model) and hands it to the plotting functions of ``gapbench.report.figures``,
which take data only.

    gapbench figure ais [--out results/ais_linear_gaussian.png] [--steps 10 30 ...] [--replot] ...
    gapbench figure curve RUN_DIR [RUN_DIR ...] --out FILE.png
    gapbench figure posterior RUN_DIR [--datapoints 0 1 2 3] [--flow iaf|planar] --out STEM
    gapbench figure track RUN_DIR [--out STEM]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gapbench.errors import RunError

TRACK_FIGURE = "gaps_over_training"  # the stem gapbench track writes in the run folder


def _ais(args: argparse.Namespace) -> int:
    from gapbench import io
    from gapbench.report.figures.ais import plot, sandwich_by_steps

    out = Path(args.out)
    title = (f"linear-Gaussian model, D = {args.data_size}, Z = {args.latent_size}: {args.num_datapoints} simulated "
             f"datapoints, {args.num_chains} chains, HMC (10 leapfrog steps), {args.schedule} schedule, from the prior")
    if args.replot:
        plot(io.read_csv(out.with_suffix(".csv")), out, title=title)
        return 0
    frame = sandwich_by_steps(data_size=args.data_size, latent_size=args.latent_size,
                              num_datapoints=args.num_datapoints, num_chains=args.num_chains, steps=tuple(args.steps),
                              schedule=args.schedule, seed=args.seed, log=lambda m: print(m, file=sys.stderr))
    io.write_csv(out.with_suffix(".csv"), frame)
    plot(frame, out, title=title)
    print(frame.to_string(index=False))
    print(f"figure written to {out}", file=sys.stderr)
    return 0


def _curve(args: argparse.Namespace) -> int:
    from gapbench.report.figures.curve import plot, read_curve

    curves = [read_curve(run_dir) for run_dir in args.run_dirs]  # FigureError (exit 2) for a run without one
    for path in plot(curves, args.out):
        print(f"figure written to {path}", file=sys.stderr)
    return 0


def posterior_columns(run_dir: str | Path, *, datapoints: list[int], flow: str = "iaf"):
    """The model, datapoints (N, D) and approximation columns of :func:`gapbench.report.figures.posterior.
    posterior_figure` for a finished run with a 2-D latent space that refined ``ffg`` and ``flow``;
    RunError with the fix otherwise."""
    import torch

    from gapbench.measure import amortized_posterior
    from gapbench.runner.run import local_family, open_run

    config, decoder, encoder, x = open_run(run_dir)
    if config.model.latent_size != 2:
        raise RunError(f"{run_dir} has a {config.model.latent_size}-D latent space; the posterior figure needs "
                       "2-D (e.g. experiments/digits_2d.toml)")
    missing = [f for f in ("ffg", flow) if f not in config.refine.families]
    if missing:
        raise RunError(f"{run_dir} did not refine {', '.join(missing)} (refine.families = {config.refine.families}); "
                       f"add them and rerun with --force, or choose --flow among them")
    if not (Path(run_dir) / "local.pt").is_file():
        raise RunError(f"{run_dir} has no local.pt; finish the run first")
    bad = [i for i in datapoints if not 0 <= i < x.shape[0]]
    if bad:
        raise RunError(f"datapoints {bad} are not among the run's {x.shape[0]} evaluated datapoints")
    saved = torch.load(Path(run_dir) / "local.pt", weights_only=True)

    def refined(family: str):
        """Datapoint i -> the refined q* of ``family`` for x[i:i + 1] (its parameters' row i)."""
        posterior = local_family(config, family).posterior
        return lambda i: posterior({k: v[i:i + 1] for k, v in saved[family].items()})

    columns = [("amortized FFG q(z|x)", lambda i: amortized_posterior(encoder, x[i:i + 1])),
               ("optimal FFG q*", refined("ffg")),
               (f"local {flow.upper() if flow == 'iaf' else flow} q*", refined(flow))]
    return decoder, x, columns


def _posterior(args: argparse.Namespace) -> int:
    from gapbench.report.figures.posterior import posterior_figure

    model, x, columns = posterior_columns(args.run_dir, datapoints=args.datapoints, flow=args.flow)
    paths = posterior_figure(model, x, columns, args.out, datapoints=args.datapoints)
    print("written: " + ", ".join(str(p) for p in paths))
    return 0


def _track(args: argparse.Namespace) -> int:
    from gapbench import io
    from gapbench.report.figures.track import track_figure

    table = Path(args.run_dir) / "track.csv"
    if not table.is_file():
        raise RunError(f"{table} does not exist; make it with gapbench track {args.run_dir}")
    paths = track_figure(io.read_csv(table), args.out or Path(args.run_dir) / TRACK_FIGURE)
    print("written: " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


def add_figure_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``gapbench figure`` and its subcommands to the command line's subparsers."""
    figure = sub.add_parser("figure", help="figures outside a run's report: the AIS/BDMC sandwich on a linear-Gaussian "
                                           "model, refinement curves, 2-D posteriors, gaps over training")
    kinds = figure.add_subparsers(dest="figure", required=True, metavar="ais|curve|posterior|track")

    ais = kinds.add_parser("ais", help="AIS and the BDMC sandwich against the number of annealing steps, on a "
                                       "linear-Gaussian model whose log p(x) is known exactly")
    ais.add_argument("--out", default="results/ais_linear_gaussian.png", help="PNG path (a CSV is written beside it)")
    ais.add_argument("--data-size", type=int, default=100)
    ais.add_argument("--latent-size", type=int, default=10)
    ais.add_argument("--num-datapoints", type=int, default=50)
    ais.add_argument("--num-chains", type=int, default=16)
    ais.add_argument("--steps", type=int, nargs="+", default=[10, 30, 100, 300, 1000, 3000])
    ais.add_argument("--schedule", choices=["linear", "sigmoid"], default="sigmoid")
    ais.add_argument("--seed", type=int, default=0)
    ais.add_argument("--replot", action="store_true", help="redraw the PNG from the CSV beside it")
    ais.set_defaults(func=_ais)

    curve = kinds.add_parser("curve", help="refinement curves of runs made with curve.enabled = true: the mean ELBO "
                                           "and the fraction of the amortization gap closed after k SVI steps")
    curve.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders made with curve.enabled = true")
    curve.add_argument("--out", required=True, help="figure path; FILE.png and FILE.pdf are written")
    curve.set_defaults(func=_curve)

    posterior = kinds.add_parser("posterior", help="a run with a 2-D latent space: the true posterior beside the "
                                                   "amortized FFG, the optimal FFG and a local flow")
    posterior.add_argument("run_dir", help="a finished run with a 2-D latent space (experiments/digits_2d.toml)")
    posterior.add_argument("--datapoints", type=int, nargs="+", default=[0, 1, 2, 3],
                           help="indices among the run's evaluated datapoints (default 0 1 2 3)")
    posterior.add_argument("--flow", default="iaf", choices=["iaf", "planar"],
                           help="the local flow to draw (default iaf)")
    posterior.add_argument("--out", required=True, help="output path without extension: STEM.png and STEM.pdf")
    posterior.set_defaults(func=_posterior)

    track = kinds.add_parser("track", help="redraw the figure of gapbench track from the run's track.csv")
    track.add_argument("run_dir", help="a run folder that gapbench track has written track.csv into")
    track.add_argument("--out", metavar="STEM",
                       help=f"output path without extension (default: RUN_DIR/{TRACK_FIGURE}, as gapbench track)")
    track.set_defaults(func=_track)


__all__ = ["add_figure_parser", "posterior_columns"]
