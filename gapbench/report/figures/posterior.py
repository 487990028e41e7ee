"""Contours of the true posterior beside the amortized FFG, the optimal (local) FFG and a local flow,
for a run with a 2-D latent space (Cremer, Li & Duvenaud, 2018, draw such pictures in their Figure 2).

The true posterior p(z|x) ∝ p(z) p(x|z) is evaluated on a grid and normalised by its sum times the
cell area (two passes: a wide grid finds the posterior's mean and spread, a fine grid around them
is drawn). The approximations are drawn on the same grid from their exact densities: the encoder's
q(z|x), the refined q*_FFG and the refined q* of a flow with a density (IAF or planar; the auxiliary
coupling flow has no tractable marginal density). Each panel's title gives the KL divergence from the
approximation to the grid posterior, in nats (KL(q || p) = log p(x) − ELBO, the gap it contributes).

    gapbench figure posterior RUN_DIR [--datapoints 0 1 2 3] [--flow iaf] --out STEM

(``gapbench.commands.figure`` opens the run and hands its model, datapoints and posteriors to
:func:`posterior_figure`.)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

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


def posterior_figure(model, x: torch.Tensor, approximations: Sequence[tuple[str, Callable[[int], Any]]],
                     stem: str | Path, *, datapoints: Sequence[int]) -> list[Path]:
    """Draw one row per datapoint: the true posterior on a grid, then each approximation on the same grid.

    Parameters
    ----------
    model : the Model (``log_prior(z)``, ``log_likelihood(x, z)``, both (K, B)) of a 2-D latent space
    x : (N, D) datapoints; row i of the figure is datapoint ``datapoints[i]``
    approximations : (title, posterior_of) per column after the first: ``posterior_of(i)`` is the
        approximation's distribution for ``x[i:i + 1]`` (``log_prob(z)`` of z (K, 1, 2) is (K, 1))
    stem : output path without extension: STEM.png and STEM.pdf are written (and returned)
    """
    use_style()
    import matplotlib.pyplot as plt

    columns = [("true posterior", None), *approximations]
    fig, axes = plt.subplots(len(datapoints), len(columns), figsize=(10.5, 2.6 * len(datapoints)), squeeze=False)
    for row, i in enumerate(datapoints):
        grid = true_posterior_grid(model, x[i:i + 1])
        zz, (a0, a1) = grid["zz"], grid["axes"]
        for col, (title, posterior_of) in enumerate(columns):
            ax = axes[row, col]
            if posterior_of is None:
                log_q, label = grid["log_post"], f"{title}\nlog p(x) = {grid['log_px']:.2f}"
            else:
                with torch.no_grad():
                    log_q = posterior_of(i).log_prob(zz.unsqueeze(1))[:, 0]  # (G, 1, 2) -> (G,)
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
