"""Variational families in their local form: free parameters per datapoint, held as (B, ...) tensors.

A family turns a dict of parameter tensors, each with the datapoints along dimension 0, into a
Posterior. Refinement (``gapbench.inference.refine``) optimises those tensors for B datapoints at once and
only ever indexes them along dimension 0, so any family written this way is refined in batch.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import torch

from gapbench.posteriors.base import Posterior
from gapbench.posteriors.coupling import AuxiliaryFlowFamily
from gapbench.posteriors.gaussian import DiagonalGaussian
from gapbench.posteriors.iaf import IAFFamily
from gapbench.posteriors.planar import PlanarFlowFamily


class LocalFamily(Protocol):
    """A variational family with free per-datapoint parameters."""

    name: str
    supports_stl: bool  # whether ``posterior(params).log_prob(z)`` exists for the "sticking the landing" gradient

    def init_params(
        self, num_datapoints: int, latent_size: int, *, like: torch.Tensor,
        init_from: Any = None, generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Initial parameters, each of shape (B, ...); ``like`` gives dtype and device; ``init_from``
        is None (start from the prior), a DiagonalGaussian, or a posterior of the same family;
        ``generator`` draws any random initial values."""
        ...

    def posterior(self, params: Mapping[str, torch.Tensor]) -> Posterior:
        """The Posterior these parameters describe."""
        ...

    def step_scale(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
        """Per-element factors for the optimiser's steps (missing names: 1), e.g. a length scale."""
        ...


class DiagonalGaussianFamily:
    """Local FFG: a free mean and log-variance per datapoint, parameters ``{"mean", "log_var"}``."""

    name = "ffg"
    supports_stl = True

    def init_params(
        self, num_datapoints: int, latent_size: int, *, like: torch.Tensor,
        init_from: DiagonalGaussian | None = None, generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """From the prior N(0, I) (Cremer et al., 2018) or from a given FFG (the encoder's output).

        Returns ``{"mean": (B, Z), "log_var": (B, Z)}``, detached copies (``generator`` is unused).
        """
        if init_from is None:
            zeros = like.new_zeros(num_datapoints, latent_size)  # (B, Z)
            return {"mean": zeros, "log_var": zeros.clone()}
        if tuple(init_from.mean.shape) != (num_datapoints, latent_size):
            raise ValueError(
                f"initial posterior has shape {tuple(init_from.mean.shape)}, "
                f"expected {(num_datapoints, latent_size)}"
            )
        return {
            "mean": init_from.mean.detach().to(like).clone(),
            "log_var": init_from.log_var.detach().to(like).clone(),
        }

    def posterior(self, params: Mapping[str, torch.Tensor]) -> DiagonalGaussian:
        return DiagonalGaussian(params["mean"], params["log_var"])

    def step_scale(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Mean steps in units of the current standard deviation.

        Adam's steps have size about lr whatever the gradient's scale, so in absolute units a step
        that is small for a wide posterior is large for a narrow one (posterior standard deviations
        of a trained VAE span 0.01 to 1). Scaling the mean's step by sigma makes the step, and the
        jitter it leaves at the optimum, the same fraction of the posterior's width in every
        dimension: Adam on u with mean = sigma * u, sigma held fixed during the step.
        """
        return {"mean": torch.exp(0.5 * params["log_var"])}


FAMILIES: dict[str, LocalFamily] = {
    "ffg": DiagonalGaussianFamily(),  # fully factorised Gaussian
    "flow": AuxiliaryFlowFamily(),  # Cremer et al. (2018): auxiliary variable, 2 coupling steps, width 100
    "planar": PlanarFlowFamily(),  # Rezende & Mohamed (2015): 10 planar layers
    "iaf": IAFFamily(),  # Kingma et al. (2016): 2 IAF steps, MADE width 100
}
FLOW_FAMILIES = ("flow", "planar", "iaf")


def get_family(name: str) -> LocalFamily:
    """Look a family up by name (``"ffg"``, ``"flow"``, ``"planar"``, ``"iaf"``) with its default sizes."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown variational family {name!r}; choose one of {sorted(FAMILIES)}") from None


def make_family(name: str, *, num_steps: int | None = None, hidden_size: int | None = None) -> LocalFamily:
    """A family with chosen sizes: ``num_steps`` coupling or IAF steps, or planar layers (None: the
    default of ``FAMILIES``); ``hidden_size`` the width of the coupling and MADE networks (None:
    default; planar flows have none). The FFG takes no sizes."""
    default = get_family(name)
    if name == "ffg":
        return default
    if name == "planar":
        return PlanarFlowFamily(num_layers=num_steps or default.num_layers)  # type: ignore[attr-defined]
    return type(default)(num_steps=num_steps or default.num_steps,  # type: ignore[attr-defined,call-arg]
                         hidden_size=hidden_size or default.hidden_size)  # type: ignore[attr-defined]
