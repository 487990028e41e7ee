"""Why does the local flow gain so little over the local FFG? A measurement on a few datapoints.

The paper-protocol reproduction (results/reproduction/fashion_mnist_full) finds L[q*_Flow] only
0.14 nats above L[q*_FFG] on the FFG-trained model, where Cremer, Li & Duvenaud (2018) report 1.61.
Two explanations predict different things:

  * under-optimised: the refined flows stop short of their optimum. Then continuing them (more steps,
    a smaller fixed step size) raises L[q*_Flow];
  * too small a family: our local flow (2 coupling steps of width 100 on a diagonal-Gaussian base)
    is near its optimum and cannot follow the posterior further. Then continuing gains ~nothing and a
    larger flow (more steps, wider networks) from the same start gains more.

This script starts from a finished run's refined q* (local.pt), takes its first N evaluation
datapoints, and measures on the same datapoints (paired, the same noise seed for every variant):

  ours            the committed q*_Flow and q*_FFG, as the run refined them
  continue(lr)    q*_Flow refined further for a fixed number of steps at a fixed step size
  on_ffg          a flow at the identity on top of q*_FFG, refined with gapbench's flow procedure
  on_ffg_continue the same, then a fixed number of steps at the last --learning-rates (converged?)
  encoder         the flow from the encoder's q (for a flow encoder: q itself), gapbench's flow procedure
  encoder_continue the same, then fixed steps as on_ffg_continue
  larger          a larger flow (--steps, --hidden) from the prior, with gapbench's flow procedure

    OMP_NUM_THREADS=1 python experiments/local_flow_diagnosis.py results/reproduction/fashion_mnist_full/ffg \
        --datapoints 32 --out results/reproduction/fashion_mnist_full/local_flow_diagnosis.json

It prints one table (mean L over the N datapoints and the paired difference to q*_FFG, ± stderr over
datapoints) and writes the figures as JSON. Its first check is that the loaded q* reproduces the
run's local.csv (within 4 standard errors per datapoint): a local.pt that does not belong to the
run is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from gapbench.estimators import elbo
from gapbench.inference.frozen import frozen
from gapbench.inference.refine import refine
from gapbench.measure import RefineProcedure, effective_procedure, local_posterior
from gapbench.posteriors import make_family
from gapbench.posteriors.gaussian import DiagonalGaussian
from gapbench.runner.run import open_run
from gapbench.runner.stage_files import read_q_star


VARIANTS = ("continue", "on_ffg", "on_ffg_continue", "encoder", "encoder_continue", "larger")


def evaluate(decoder, family, params, x, *, num_samples: int, seed: int) -> torch.Tensor:
    """ELBO per datapoint (N,) from ``num_samples`` draws; the same seed for every variant (paired)."""
    with torch.no_grad():
        return elbo(decoder, family.posterior(params), x, num_samples=num_samples,
                    generator=torch.Generator().manual_seed(seed)).value.double()


def fixed_steps(decoder, family, params, x, *, steps: int, learning_rate: float, seed: int) -> dict:
    """``steps`` Adam steps at a fixed step size from ``params`` (no stopping test: the window test with
    a patience no run reaches), returning the last iterate."""
    procedure = effective_procedure(family, RefineProcedure.for_flows()._replace(
        learning_rate=learning_rate, max_steps=steps, patience=10**9, lr_decay=1.0, convergence="window"))
    with frozen(decoder):
        result = refine(decoder, x, family=family, init_params=params, **procedure._asdict(),
                        generator=torch.Generator().manual_seed(seed))
    return result.params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--datapoints", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=2000)
    parser.add_argument("--continue-steps", type=int, default=2000)
    parser.add_argument("--continue-rounds", type=int, default=1,
                        help="on_ffg_continue: rounds of --continue-steps, L evaluated after each")
    parser.add_argument("--learning-rates", type=float, nargs="*", default=[1e-3, 1e-2])
    parser.add_argument("--steps", type=int, default=4, help="coupling steps of the larger flow")
    parser.add_argument("--hidden", type=int, default=200, help="hidden width of the larger flow")
    parser.add_argument("--skip", nargs="*", default=[], choices=VARIANTS)
    parser.add_argument("--procedure", nargs="*", default=[], metavar="KEY=VALUE",
                        help="on_ffg: fields of RefineProcedure.for_flows() to replace, e.g. check_every=500")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    try:
        args.procedure = {k: type(getattr(RefineProcedure(), k))(v) for k, v in (item.split("=", 1) for item in args.procedure)}
    except (ValueError, AttributeError) as error:
        parser.error(f"--procedure takes KEY=VALUE with KEY a field of RefineProcedure ({', '.join(RefineProcedure._fields)}): {error}")

    config, decoder, encoder, x_all = open_run(args.run_dir)
    n = min(args.datapoints, x_all.shape[0])
    x = x_all[:n]
    local_csv = pd.read_csv(args.run_dir / "local.csv").set_index("index")
    flow = make_family("flow", num_steps=config.model.flow_steps, hidden_size=config.model.flow_hidden)
    ffg = make_family("ffg")
    q_flow = {k: v[:n].clone() for k, v in read_q_star(args.run_dir / "local.pt", "flow", x_all.shape[0]).items()}
    q_ffg = {k: v[:n].clone() for k, v in read_q_star(args.run_dir / "local.pt", "ffg", x_all.shape[0]).items()}
    print(f"{args.run_dir}: first {n} evaluation datapoints; {torch.get_num_threads()} thread(s)", flush=True)

    values: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    last_params: dict[str, dict[str, torch.Tensor]] = {}
    values["q*_FFG (run)"] = evaluate(decoder, ffg, q_ffg, x, num_samples=args.eval_samples, seed=args.seed + 1)
    values["q*_Flow (run)"] = evaluate(decoder, flow, q_flow, x, num_samples=args.eval_samples, seed=args.seed + 1)
    for column, key in (("elbo_q_star_ffg", "q*_FFG (run)"), ("elbo_q_star_flow", "q*_Flow (run)")):
        saved = torch.tensor(local_csv[column].to_numpy()[:n], dtype=torch.float64)
        stderr = torch.tensor(local_csv[f"{column}_stderr"].to_numpy()[:n], dtype=torch.float64)
        off = (values[key] - saved).abs() > 8 * stderr  # 4 stderr of the difference: ours has fewer samples
        if bool(off.any()):
            print(f"error: {args.run_dir}/local.pt does not reproduce local.csv's {column} on datapoints "
                  f"{off.nonzero().flatten().tolist()}; it is not this run's q* (rerun the local stage)", file=sys.stderr)
            return 2

    def timed(name: str, make) -> None:
        start = time.perf_counter()
        family, params = make()
        seconds[name] = time.perf_counter() - start
        values[name] = evaluate(decoder, family, params, x, num_samples=args.eval_samples, seed=args.seed + 1)
        diff = values[name] - values["q*_FFG (run)"]
        print(f"  {name}: mean {values[name].mean():.3f}, over q*_FFG {diff.mean():+.3f} ± "
              f"{diff.std() / n ** 0.5:.3f} ({seconds[name]:.0f} s)", flush=True)

    def continue_rounds(start: str, *, seed: int) -> None:
        """--continue-rounds rounds of fixed steps at the last --learning-rates from ``last_params[start]``,
        each evaluated."""
        lr = args.learning_rates[-1]
        for round in range(1, args.continue_rounds + 1):
            def more(round=round):
                params = fixed_steps(decoder, flow, last_params[start], x, steps=args.continue_steps,
                                     learning_rate=lr, seed=seed + 100 * round)
                last_params[start] = params
                return flow, params
            timed(f"  the same + {round * args.continue_steps} steps at lr {lr:g}", more)

    if "continue" not in args.skip:
        for lr in args.learning_rates:
            timed(f"q*_Flow (run) + {args.continue_steps} steps at lr {lr:g}",
                  lambda lr=lr: (flow, fixed_steps(decoder, flow, q_flow, x, steps=args.continue_steps,
                                                   learning_rate=lr, seed=args.seed + 2)))
    if "on_ffg" not in args.skip:
        def on_ffg():
            start = flow.init_params(n, q_ffg["mean"].shape[1], like=q_ffg["mean"],
                                     init_from=DiagonalGaussian(q_ffg["mean"], q_ffg["log_var"]),
                                     generator=torch.Generator().manual_seed(args.seed + 3))
            procedure = effective_procedure(flow, RefineProcedure.for_flows()._replace(**args.procedure))
            with frozen(decoder):
                params = refine(decoder, x, family=flow, init_params=start, **procedure._asdict(),
                                generator=torch.Generator().manual_seed(args.seed + 4)).params
            last_params["flow from q*_FFG"] = params
            return flow, params
        timed("flow from q*_FFG (identity on top), gapbench procedure"
              + "".join(f", {k} {v}" for k, v in args.procedure.items()), on_ffg)
        if "on_ffg_continue" not in args.skip:
            continue_rounds("flow from q*_FFG", seed=args.seed + 2)
    if "encoder" not in args.skip:
        def from_encoder():
            params = local_posterior(decoder, encoder, x, family=flow, init="encoder",
                                     generator=torch.Generator().manual_seed(args.seed + 6)).params
            last_params["encoder"] = params
            return flow, params
        timed("flow from the encoder's q, gapbench procedure", from_encoder)
        if "encoder_continue" not in args.skip:
            continue_rounds("encoder", seed=args.seed + 7)
    if "larger" not in args.skip:
        larger = make_family("flow", num_steps=args.steps, hidden_size=args.hidden)
        timed(f"flow of {args.steps} steps, width {args.hidden}, from the prior, gapbench procedure",
              lambda: (larger, local_posterior(decoder, encoder, x, family=larger, init="prior",
                                               generator=torch.Generator().manual_seed(args.seed + 5)).params))

    base = values["q*_FFG (run)"]
    rows = []
    print(f"\nL with {args.eval_samples} samples on the first {n} datapoints (same noise for every row); "
          "difference to q*_FFG paired, ± stderr over datapoints")
    print("| variant | mean L | − L[q*_FFG] | seconds |")
    print("|---|---:|---:|---:|")
    for name, value in values.items():
        diff = value - base
        rows.append({"variant": name, "mean": float(value.mean()), "over_q_star_ffg": float(diff.mean()),
                     "over_q_star_ffg_stderr": float(diff.std() / n ** 0.5), "seconds": seconds.get(name)})
        print(f"| {name} | {value.mean():.3f} | {diff.mean():+.3f} ± {diff.std() / n ** 0.5:.3f} | "
              f"{seconds.get(name, float('nan')):.0f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"run_dir": str(args.run_dir), "datapoints": n, "eval_samples": args.eval_samples,
                                        "continue_steps": args.continue_steps, "seed": args.seed,
                                        "larger": {"steps": args.steps, "hidden": args.hidden},
                                        "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
