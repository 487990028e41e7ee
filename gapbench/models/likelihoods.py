"""Observation log-densities, summed over data dimensions. Each is a full normalised density."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2.0 * math.pi)


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(x; sigmoid(logits)) = sum_d x_d l_d - softplus(l_d).

    Parameters
    ----------
    logits : (K, B, D)
    x : (B, D), values in {0, 1} (values in [0, 1] give the continuous cross-entropy)

    Returns
    -------
    (K, B)
    """
    # softplus(l) = log(1 + e^l) is returned as l itself above the threshold: an error of e^-30
    # (1e-13) there, and one elementwise pass fewer than binary_cross_entropy_with_logits
    return (logits * x).sum(-1) - F.softplus(logits, threshold=30.0).sum(-1)  # (K, B)


def gaussian_log_prob(mean: torch.Tensor, log_var: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, diag(exp(log_var))) summed over the last dimension.

    Parameters
    ----------
    mean : (K, B, D)
    log_var : (K, B, D), (D,) or a float
    x : (B, D)

    Returns
    -------
    (K, B)
    """
    log_var = torch.as_tensor(log_var, dtype=mean.dtype, device=mean.device)
    return -0.5 * ((x - mean).square() * torch.exp(-log_var) + log_var + LOG_2PI).sum(-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) for z of shape (K, B, Z); returns (K, B)."""
    return -0.5 * (z.square() + LOG_2PI).sum(-1)


MIN_LOG_SCALE = -7.0  # PixelCNN++'s floor on the logistic's log-scale: e^-7 = 0.0009, a quarter of 1/255


def discretized_logistic_log_prob(mean: torch.Tensor, log_scale: torch.Tensor, x: torch.Tensor, *,
                                  num_levels: int) -> torch.Tensor:
    """log P(x) of the discretised logistic over the levels k / (L - 1), k = 0..L-1, summed over pixels.

    Each pixel's probability is the mass a Logistic(mean, s) puts on its level's bin of half-width
    h = 1 / (2 (L - 1)), the two end bins stretched to -inf and +inf (Kingma et al., 2016, "Improved
    Variational Inference with Inverse Autoregressive Flow", appendix; Salimans et al., 2017,
    "PixelCNN++", eq. 2):

        P(x) = sigmoid(u) - sigmoid(l),   u = (x + h - mean) / s,   l = (x - h - mean) / s,
        P(0) = sigmoid(u),                P(1) = 1 - sigmoid(l).

    The difference is computed as sigmoid(u) sigmoid(-l) (1 - e^(l - u)), exact and stable for bins
    far in either tail. A probability mass function (the masses of the L levels sum to 1), so the
    bounds are log-probabilities: at most 0, comparable across models, -log P / (D log 2) is bits per
    dimension. ``log_scale`` is clamped below at ``MIN_LOG_SCALE``.

    Parameters
    ----------
    mean, log_scale : (K, B, D)
    x : (B, D), values k / (L - 1)
    num_levels : L >= 2

    Returns
    -------
    (K, B)
    """
    log_scale = log_scale.clamp(min=MIN_LOG_SCALE)
    inv_scale = torch.exp(-log_scale)  # (K, B, D)
    half_width = 0.5 / (num_levels - 1)
    centred = x - mean  # (K, B, D)
    upper = (centred + half_width) * inv_scale  # u
    lower = (centred - half_width) * inv_scale  # l
    log_cdf_upper = F.logsigmoid(upper)  # log sigmoid(u): the mass below the upper edge
    log_sf_lower = F.logsigmoid(-lower)  # log (1 - sigmoid(l)): the mass above the lower edge
    log_width = torch.log(-torch.expm1(-2.0 * half_width * inv_scale))  # log (1 - e^(l - u)); u - l = 2h / s
    middle = log_cdf_upper + log_sf_lower + log_width
    is_bottom = x < half_width  # level 0
    is_top = x > 1.0 - half_width  # level L - 1
    log_p = torch.where(is_bottom, log_cdf_upper, torch.where(is_top, log_sf_lower, middle))
    return log_p.sum(-1)  # (K, B)


def discretized_logistic_sample(mean: torch.Tensor, log_scale: torch.Tensor, *, num_levels: int,
                                generator: torch.Generator | None) -> torch.Tensor:
    """x ~ the discretised logistic: a logistic draw rounded to the nearest level and clipped to
    [0, 1] (the end bins take the tails); any shape, returns the shape of ``mean``."""
    u = torch.rand(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    u = u.clamp(1e-6, 1 - 1e-6)
    y = mean + torch.exp(log_scale.clamp(min=MIN_LOG_SCALE)) * (torch.log(u) - torch.log1p(-u))
    return (y.clamp(0.0, 1.0) * (num_levels - 1)).round() / (num_levels - 1)


class BernoulliLikelihood:
    """p(x|z) = prod_d Bernoulli(x_d; sigmoid(l_d)): one parameter (the logit) per pixel; 0/1 data."""

    name = "bernoulli"
    params_per_pixel = 1

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """params (K, B, D) logits, x (B, D) -> (K, B)."""
        return bernoulli_log_prob(params, x)

    def sample(self, params: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor:
        """(..., D) logits -> (..., D) binary draws."""
        return torch.bernoulli(torch.sigmoid(params), generator=generator)

    def settings(self) -> dict:
        return {"likelihood": self.name}


class DiscretizedLogisticLikelihood:
    """p(x|z) = prod_d DiscretizedLogistic(x_d; mean_d, s_d) over ``num_levels`` levels: two parameters
    per pixel, laid out as ``params = [mean (D), log_scale (D)]`` along the last dimension."""

    name = "logistic"
    params_per_pixel = 2

    def __init__(self, num_levels: int):
        if num_levels < 2:
            raise ValueError(f"a discretised likelihood needs at least 2 levels, got {num_levels}")
        self.num_levels = num_levels

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """params (K, B, 2D), x (B, D) -> (K, B)."""
        mean, log_scale = params.chunk(2, dim=-1)  # (K, B, D) each
        return discretized_logistic_log_prob(mean, log_scale, x, num_levels=self.num_levels)

    def sample(self, params: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor:
        """(..., 2D) -> (..., D) levels k / (L - 1)."""
        mean, log_scale = params.chunk(2, dim=-1)
        return discretized_logistic_sample(mean, log_scale, num_levels=self.num_levels, generator=generator)

    def settings(self) -> dict:
        return {"likelihood": self.name, "num_levels": self.num_levels}


LIKELIHOODS = ("bernoulli", "logistic")


def make_likelihood(name: str, *, num_levels: int = 256) -> BernoulliLikelihood | DiscretizedLogisticLikelihood:
    """``"bernoulli"`` (binary pixels) or ``"logistic"`` (the discretised logistic over ``num_levels``)."""
    if name == "bernoulli":
        return BernoulliLikelihood()
    if name == "logistic":
        return DiscretizedLogisticLikelihood(num_levels)
    raise ValueError(f"unknown likelihood {name!r}; choose one of {LIKELIHOODS}")
