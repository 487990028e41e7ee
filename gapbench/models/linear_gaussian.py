"""Linear-Gaussian latent variable model with every quantity of interest in closed form.

p(z) = N(0, I_Z),  p(x|z) = N(W z + b, sigma^2 I_D).

Closed forms (Bishop, 2006, sections 2.3.3 and 12.2; Tipping & Bishop, 1999):
    p(x)    = N(x; b, W W^T + sigma^2 I)
    p(z|x)  = N(m, S),  S = Lambda^{-1},  Lambda = I + W^T W / sigma^2,  m = S W^T (x - b) / sigma^2
    the diagonal Gaussian q* maximising the ELBO (minimising KL(q || p(z|x))) has mean m and
    variances 1 / diag(Lambda) (e.g. Turner & Sahani, 2011; Bishop, 2006, section 10.1.2)
    ELBO(q) = log p(x) - KL(q || p(z|x)).
This is the ground truth for every estimator in gapbench.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import MultivariateNormal

from gapbench.models.likelihoods import gaussian_log_prob, standard_normal_log_prob


class LinearGaussian:
    """Parameters: ``weight`` (D, Z), ``bias`` (D,), noise standard deviation ``sigma``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, sigma: float):
        if weight.ndim != 2 or bias.shape != weight.shape[:1] or sigma <= 0:
            raise ValueError("need weight (D, Z), bias (D,) and sigma > 0")
        self.weight = weight
        self.bias = bias
        self.sigma = float(sigma)

    @classmethod
    def random(cls, data_size: int, latent_size: int, *, sigma: float = 1.0, scale: float = 1.0,
               generator: torch.Generator | None, dtype: torch.dtype = torch.float64) -> "LinearGaussian":
        """A model with W ~ scale * N(0, 1/Z) entries and b ~ N(0, 1)."""
        weight = scale * torch.randn(data_size, latent_size, generator=generator, dtype=dtype) / math.sqrt(latent_size)
        bias = torch.randn(data_size, generator=generator, dtype=dtype)
        return cls(weight, bias, sigma)

    @property
    def data_size(self) -> int:
        return self.weight.shape[0]

    @property
    def latent_size(self) -> int:
        return self.weight.shape[1]

    # --- the Model interface -------------------------------------------------------------------
    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I): (K, B, Z) -> (K, B)."""
        return standard_normal_log_prob(z)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log N(x; W z + b, sigma^2 I): x (B, D), z (K, B, Z) -> (K, B)."""
        mean = z @ self.weight.T + self.bias  # (K, B, D)
        return gaussian_log_prob(mean, 2.0 * math.log(self.sigma), x)

    def sample_x(self, z: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor:
        """x ~ p(x|z) = N(W z + b, sigma^2 I): (..., Z) -> (..., D)."""
        mean = z @ self.weight.T + self.bias  # (..., D)
        return mean + self.sigma * torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)

    # --- closed forms --------------------------------------------------------------------------
    def sample(self, num_datapoints: int, *, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw (x, z) from the joint: x (N, D), z (N, Z)."""
        dtype = self.weight.dtype
        z = torch.randn(num_datapoints, self.latent_size, generator=generator, dtype=dtype)  # (N, Z)
        noise = torch.randn(num_datapoints, self.data_size, generator=generator, dtype=dtype)  # (N, D)
        return z @ self.weight.T + self.bias + self.sigma * noise, z

    def marginal(self) -> MultivariateNormal:
        """p(x) = N(b, W W^T + sigma^2 I)."""
        eye = torch.eye(self.data_size, dtype=self.weight.dtype)
        return MultivariateNormal(self.bias, self.weight @ self.weight.T + self.sigma**2 * eye)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x): (B, D) -> (B,)."""
        return self.marginal().log_prob(x)

    def posterior_precision(self) -> torch.Tensor:
        """Lambda = I + W^T W / sigma^2, shared by all datapoints: (Z, Z)."""
        eye = torch.eye(self.latent_size, dtype=self.weight.dtype)
        return eye + self.weight.T @ self.weight / self.sigma**2

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact p(z|x) = N(m, S): returns m (B, Z) and S (Z, Z)."""
        cov = torch.linalg.inv(self.posterior_precision())  # (Z, Z)
        mean = (x - self.bias) @ self.weight @ cov / self.sigma**2  # (B, Z); S is symmetric
        return mean, cov

    def posterior_distribution(self, x: torch.Tensor) -> MultivariateNormal:
        """p(z|x) as a Distribution with batch shape (B,) and event shape (Z,): an exact encoder."""
        mean, cov = self.posterior(x)
        return MultivariateNormal(mean, covariance_matrix=cov.expand(x.shape[0], -1, -1))

    def optimal_diagonal(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The best diagonal Gaussian: mean m (B, Z) and variances 1/diag(Lambda) (B, Z)."""
        mean, _ = self.posterior(x)
        var = 1.0 / torch.diagonal(self.posterior_precision())  # (Z,)
        return mean, var.expand_as(mean)

    def elbo_diagonal(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """Exact ELBO of q = N(mean, diag(var)): log p(x) - KL(q || p(z|x)); returns (B,).

        KL(N(mu, V) || N(m, S)) = 1/2 [tr(Lambda V) + (mu - m)^T Lambda (mu - m) - Z + log|S| - log|V|].
        """
        m, _ = self.posterior(x)
        precision = self.posterior_precision()  # (Z, Z)
        diff = mean - m  # (B, Z)
        trace = (torch.diagonal(precision) * var).sum(-1)  # (B,)
        quad = ((diff @ precision) * diff).sum(-1)  # (B,)
        log_det_s = -torch.logdet(precision)
        kl = 0.5 * (trace + quad - self.latent_size + log_det_s - torch.log(var).sum(-1))
        return self.log_marginal(x) - kl

    def perturbed_encoder(self, x: torch.Tensor, amortization_gap: float, *, var_factor: float = 1.3):
        """An amortized FFG encoder with a known, chosen amortization gap: the optimal diagonal Gaussian
        with every mean shifted by s and the variances times ``var_factor``, s found by bisection on the
        closed-form ELBO so that the mean gap L[q*] - L[q] over x is ``amortization_gap`` (reachable
        when var_factor alone costs less). Returns the encoder (x (B, D) -> Distribution) and the gap."""
        from torch.distributions import Independent, Normal

        mean, var = self.optimal_diagonal(x)
        best = self.elbo_diagonal(x, mean, var)

        def gap(shift: float) -> float:
            return (best - self.elbo_diagonal(x, mean + shift, var_factor * var)).mean().item()

        low, high = 0.0, 10.0
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if gap(middle) < amortization_gap else (low, middle)
        shift = (low + high) / 2

        def encoder(batch: torch.Tensor):
            m, v = self.optimal_diagonal(batch)
            return Independent(Normal(m + shift, (var_factor * v).sqrt()), 1)
        return encoder, gap(shift)
