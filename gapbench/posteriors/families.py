"""Variational families in their local form: free parameters per datapoint, held as (B, ...) tensors.

A family turns a dict of parameter tensors, each with the datapoints along dimension 0, into a
Posterior. Refinement (``gapbench.refine``) optimises those tensors for B datapoints at once and
only ever indexes them along dimension 0, so any family written this way is refined in batch.
"""

from __future__ import annotations

from typing import Mapping, Protocol

import torch

from .gaussian import DiagonalGaussian


class LocalFamily(Protocol):
    """A variational family with free per-datapoint parameters."""

    name: str

    def init_params(
        self, num_datapoints: int, latent_size: int, *, like: torch.Tensor,
        init_from: DiagonalGaussian | None = None,
    ) -> dict[str, torch.Tensor]:
        """Initial parameters, each of shape (B, ...); ``like`` gives dtype and device."""
        ...

    def posterior(self, params: Mapping[str, torch.Tensor]) -> DiagonalGaussian:
        """The Posterior these parameters describe."""
        ...

    def step_scale(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-element factors for the optimiser's steps (missing names: 1), e.g. a length scale."""
        ...


class DiagonalGaussianFamily:
    """Local FFG: a free mean and log-variance per datapoint, parameters ``{"mean", "log_var"}``."""

    name = "ffg"

    def init_params(
        self, num_datapoints: int, latent_size: int, *, like: torch.Tensor,
        init_from: DiagonalGaussian | None = None,
    ) -> dict[str, torch.Tensor]:
        """From the prior N(0, I) (Cremer et al., 2018) or from a given FFG (the encoder's output).

        Returns ``{"mean": (B, Z), "log_var": (B, Z)}``, detached copies.
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


FAMILIES: dict[str, LocalFamily] = {"ffg": DiagonalGaussianFamily()}


def get_family(name: str) -> LocalFamily:
    """Look a family up by name (``"ffg"``)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown variational family {name!r}; choose one of {sorted(FAMILIES)}") from None
