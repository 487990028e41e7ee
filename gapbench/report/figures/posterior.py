"""Contours of the true posterior beside the amortized FFG, the optimal (local) FFG and a local flow,
for a run with a 2-D latent space (Cremer, Li & Duvenaud, 2018, draw such pictures in their Figure 2).

The true posterior p(z|x) ∝ p(z) p(x|z) is evaluated on a grid and normalised by its sum times the
cell area (two passes: a wide grid finds the posterior's mean and spread, a fine grid around them
is drawn). The approximations are drawn on the same grid from their exact densities: the encoder's
q(z|x), the refined q*_FFG and the refined q* of a flow with a density (IAF or planar; the auxiliary
coupling flow has no tractable marginal density). Each panel's title gives the KL divergence from the
approximation to the grid posterior, in nats (KL(q || p) = log p(x) − ELBO, the gap it contributes).

    python -m gapbench.report.figures.posterior RUN_DIR [--datapoints 0 1 2 3] [--flow iaf] --out STEM
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from gapbench.report.figures.common import save, use_style

WIDE = 5.0  # the first grid covers [-WIDE, WIDE]^2 (the prior's mass and more)


def _grid(center: torch.Tensor, half_width: torch.Tensor, size: int,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Points (size*size, 2), the axes (2, size), and the cell area."""
    axes = torch.stack([torch.linspace(float(c - h), float(c + h), size, dtype=dtype)
                        for c, h in zip(center, half_width)])
    zz = torch.cartesian_prod(axes[0], axes[1])
    area = float((axes[0, 1] - axes[0, 0]) * (axes[1, 1] - axes[1, 0]))
    return zz, axes, area


@torch.no_grad()
def log_joint_on(model, x: torch.Tensor, zz: torch.Tensor) -> torch.Tensor:
    """log p(x, z) for one datapoint x (1, D) at the grid points zz (G, 2); returns (G,)."""
    z = zz.unsqueeze(1)  # (G, 1, 2): grid points as samples
    return (model.log_prior(z) + model.log_likelihood(x, z))[:, 0]


@torch.no_grad()
def true_posterior_grid(model, x: torch.Tensor, *, size: int = 160) -> dict:
    """The normalised log p(z|x) on a fine grid around the posterior; also log p(x) by quadrature."""
    zz, _, area = _grid(torch.zeros(2), torch.full((2,), WIDE), 200, x.dtype)
    log_joint = log_joint_on(model, x, zz)
    weights = torch.softmax(log_joint, 0)
    mean = weights @ zz
    std = (weights @ (zz - mean) ** 2).sqrt()
    zz, axes, area = _grid(mean, torch.clamp(4.5 * std, min=0.05), size, x.dtype)
    log_joint = log_joint_on(model, x, zz)
    log_px = torch.logsumexp(log_joint, 0) + math.log(area)
    return {"zz": zz, "axes": axes, "area": area, "log_post": log_joint - log_px, "log_px": float(log_px)}


def kl_on_grid(log_q: torch.Tensor, log_post: torch.Tensor, area: float) -> float:
    """KL(q || p) by quadrature over the grid (q's mass outside the grid ignored)."""
    q = torch.exp(log_q) * area
    return float((q * (log_q - log_post)).sum())


def posterior_figure(run_dir: str | Path, stem: str | Path, *, datapoints: list[int], flow: str = "iaf") -> list[Path]:
    """Draw the figure for a finished run (2-D latent, ``flow`` among its refine.families)."""
    from gapbench.runner.run import local_family, open_run
    from gapbench.measure import amortized_posterior
    from gapbench.runner.rundir import RunError

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

    use_style()
    import matplotlib.pyplot as plt

    columns = [("true posterior", None), ("amortized FFG q(z|x)", "encoder"), ("optimal FFG q*", "ffg"),
               (f"local {flow.upper() if flow == 'iaf' else flow} q*", flow)]
    fig, axes = plt.subplots(len(datapoints), 4, figsize=(10.5, 2.6 * len(datapoints)), squeeze=False)
    for row, i in enumerate(datapoints):
        xi = x[i:i + 1]
        grid = true_posterior_grid(decoder, xi)
        zz, (a0, a1) = grid["zz"], grid["axes"]
        for col, (title, source) in enumerate(columns):
            ax = axes[row, col]
            if source is None:
                log_q, label = grid["log_post"], f"{title}\nlog p(x) = {grid['log_px']:.2f}"
            else:
                if source == "encoder":
                    q = amortized_posterior(encoder, xi)
                else:
                    params = {k: v[i:i + 1] for k, v in saved[source].items()}
                    q = local_family(config, source).posterior(params)
                with torch.no_grad():
                    log_q = q.log_prob(zz.unsqueeze(1))[:, 0]
                label = f"{title}\nKL(q‖p) = {kl_on_grid(log_q, grid['log_post'], grid['area']):.2f} nats"
            density = torch.exp(log_q).reshape(len(a0), len(a1)).T  # rows: z_2, columns: z_1
            ax.contourf(a0.numpy(), a1.numpy(), density.numpy(), levels=12, cmap="Blues")
            ax.contour(a0.numpy(), a1.numpy(), torch.exp(grid["log_post"]).reshape(len(a0), len(a1)).T.numpy(),
                       levels=5, colors="k", linewidths=0.5, alpha=0.4)
            ax.set_title(label, fontsize=8)
            ax.set_xlabel("$z_1$")
            if col == 0:
                ax.set_ylabel(f"datapoint {i}\n$z_2$")
    fig.suptitle("Posteriors of a 2-D latent model (grey lines: the true posterior)", fontsize=10)
    fig.tight_layout()
    return save(fig, stem)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gapbench.report.figures.posterior", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished run with a 2-D latent space (experiments/digits_2d.toml)")
    parser.add_argument("--datapoints", type=int, nargs="+", default=[0, 1, 2, 3],
                        help="indices among the run's evaluated datapoints (default 0 1 2 3)")
    parser.add_argument("--flow", default="iaf", choices=["iaf", "planar"], help="the local flow to draw (default iaf)")
    parser.add_argument("--out", required=True, help="output path without extension: STEM.png and STEM.pdf")
    args = parser.parse_args(argv)
    from gapbench.runner.rundir import RunError

    try:
        paths = posterior_figure(args.run_dir, args.out, datapoints=args.datapoints, flow=args.flow)
    except RunError as error:
        print(f"posterior_figure: error: {error}", file=sys.stderr)
        return 2
    print("written: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
