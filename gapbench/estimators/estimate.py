"""The value every estimator returns."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Estimate(NamedTuple):
    """Per-datapoint estimate of a bound on log p(x).

    Attributes
    ----------
    value : (B,) the estimate, in nats
    stderr : (B,) its Monte Carlo standard error
    ess : (B,) effective sample size (sum w)^2 / sum w^2 of the importance weights
        w = p(x, z) / q(z) (Kish, 1965); near K when q is close to the posterior
    """

    value: torch.Tensor
    stderr: torch.Tensor
    ess: torch.Tensor
