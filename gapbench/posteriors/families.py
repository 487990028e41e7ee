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


FAMILIES: dict[str, LocalFamily] = {"ffg": DiagonalGaussianFamily()}


def get_family(name: str) -> LocalFamily:
    """Look a family up by name (``"ffg"``)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown variational family {name!r}; choose one of {sorted(FAMILIES)}") from None
