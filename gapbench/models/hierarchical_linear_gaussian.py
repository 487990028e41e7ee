"""Two-layer linear-Gaussian model with every quantity of interest in closed form.

    p(z2)    = N(0, I_{Z2})
    p(z1|z2) = N(A z2 + a, S1),   S1 = diag(var1)
    p(x|z1)  = N(B z1 + b, S0),   S0 = diag(var0)

over the joint latent z = concat(z1, z2), like :class:`HierarchicalDecoder`. Closed forms (Bishop,
2006, sections 2.3.3 and 8.1.4: a linear-Gaussian chain is jointly Gaussian):
    p(x)       = N(x; B a + b, B (A A^T + S1) B^T + S0)
    p(z)       = N(mu0, P),  mu0 = (a, 0),  P = [[A A^T + S1, A], [A^T, I]]
    p(z|x)     = N(m, Lambda^{-1}),  Lambda = P^{-1} + H^T S0^{-1} H,  H = [B, 0],
                 m = Lambda^{-1} (P^{-1} mu0 + H^T S0^{-1} (x - b))
    p(z2|z1, x) = p(z2|z1) (x depends on z2 only through z1) = N(M z1 + c, V),
                 V = (I + A^T S1^{-1} A)^{-1},  M = V A^T S1^{-1},  c = -M a
    ELBO(q)    = log p(x) - KL(q || p(z|x)) for any Gaussian q.
The structured posterior q(z1|x) q(z2|z1) with a linear-Gaussian conditional is itself Gaussian
(:func:`linear_conditional_joint`), so its ELBO is exact too. This is the ground truth for the
hierarchical estimators.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import MultivariateNormal

from gapbench.models.hierarchical import prior_noise
from gapbench.models.likelihoods import gaussian_log_prob, standard_normal_log_prob


class HierarchicalLinearGaussian:
    """Parameters: ``A`` (Z1, Z2), ``a`` (Z1,), ``var1`` (Z1,), ``B`` (D, Z1), ``b`` (D,), ``var0`` (D,)."""

    def __init__(self, A: torch.Tensor, a: torch.Tensor, var1: torch.Tensor, B: torch.Tensor, b: torch.Tensor,
                 var0: torch.Tensor):
        z1 = A.shape[0]
        d = B.shape[0]
        if (a.shape != (z1,) or var1.shape != (z1,) or B.shape != (d, z1) or b.shape != (d,)
                or var0.shape != (d,) or bool((var1 <= 0).any()) or bool((var0 <= 0).any())):
            raise ValueError("need A (Z1, Z2), a (Z1,), var1 (Z1,) > 0, B (D, Z1), b (D,), var0 (D,) > 0")
        self.A, self.a, self.var1, self.B, self.b, self.var0 = A, a, var1, B, b, var0

    @classmethod
    def random(cls, data_size: int, latent_size_1: int, latent_size_2: int, *, scale: float = 1.0,
               generator: torch.Generator | None, dtype: torch.dtype = torch.float64) -> "HierarchicalLinearGaussian":
        """A model with A, B ~ scale * N(0, 1/fan_in), a, b ~ N(0, 1), variances ~ U(0.2, 1)."""
        def randn(*shape):
            return torch.randn(*shape, generator=generator, dtype=dtype)

        def uniform(n):
            return 0.2 + 0.8 * torch.rand(n, generator=generator, dtype=dtype)

        A = scale * randn(latent_size_1, latent_size_2) / math.sqrt(latent_size_2)
        B = scale * randn(data_size, latent_size_1) / math.sqrt(latent_size_1)
        return cls(A, randn(latent_size_1), uniform(latent_size_1), B, randn(data_size), uniform(data_size))

    @property
    def data_size(self) -> int:
        return self.B.shape[0]

    @property
    def latent_size_1(self) -> int:
        return self.A.shape[0]

    @property
    def latent_size_2(self) -> int:
        return self.A.shape[1]

    @property
    def latent_size(self) -> int:
        """The joint size Z1 + Z2."""
        return self.latent_size_1 + self.latent_size_2

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (..., Z1 + Z2) -> z1 (..., Z1), z2 (..., Z2)."""
        return z[..., :self.latent_size_1], z[..., self.latent_size_1:]

    # --- the Model interface -------------------------------------------------------------------
    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z2; 0, I) + log N(z1; A z2 + a, S1): (K, B, Z1 + Z2) -> (K, B)."""
        z1, z2 = self.split(z)
        return standard_normal_log_prob(z2) + gaussian_log_prob(z2 @ self.A.T + self.a, torch.log(self.var1), z1)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log N(x; B z1 + b, S0): x (B, D), z (K, B, Z1 + Z2) -> (K, B)."""
        z1, _ = self.split(z)
        return gaussian_log_prob(z1 @ self.B.T + self.b, torch.log(self.var0), x)

    def sample_prior(self, shape: tuple[int, ...], *, generator: torch.Generator | None,
                     dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """Ancestral draws z2 ~ N(0, I), z1 ~ p(z1|z2): (*shape, Z1 + Z2)."""
        dtype = self.A.dtype  # the model's precision, whatever the caller's data is
        z2 = prior_noise((*shape, self.latent_size_2), generator=generator, dtype=dtype, device=None)
        noise = prior_noise((*shape, self.latent_size_1), generator=generator, dtype=dtype, device=None)
        return torch.cat([z2 @ self.A.T + self.a + self.var1.sqrt() * noise, z2], dim=-1)

    def sample_x(self, z: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor:
        """x ~ N(B z1 + b, S0): (..., Z1 + Z2) -> (..., D)."""
        mean = self.split(z)[0] @ self.B.T + self.b  # (..., D)
        return mean + self.var0.sqrt() * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)

    def sample(self, num_datapoints: int, *, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw (x, z) from the joint: x (N, D), z (N, Z1 + Z2)."""
        z = self.sample_prior((num_datapoints,), generator=generator)
        return self.sample_x(z, generator=generator), z

    # --- closed forms --------------------------------------------------------------------------
    def marginal(self) -> MultivariateNormal:
        """p(x) = N(B a + b, B (A A^T + S1) B^T + S0)."""
        cov_z1 = self.A @ self.A.T + torch.diag(self.var1)  # (Z1, Z1)
        return MultivariateNormal(self.B @ self.a + self.b, self.B @ cov_z1 @ self.B.T + torch.diag(self.var0))

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x): (B, D) -> (B,)."""
        return self.marginal().log_prob(x)

    def prior_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean mu0 (Z,) and covariance P (Z, Z) of the joint prior p(z1, z2)."""
        eye2 = torch.eye(self.latent_size_2, dtype=self.A.dtype)
        cov = torch.cat([torch.cat([self.A @ self.A.T + torch.diag(self.var1), self.A], 1),
                         torch.cat([self.A.T, eye2], 1)], 0)  # (Z, Z)
        return torch.cat([self.a, torch.zeros(self.latent_size_2, dtype=self.A.dtype)]), cov

    def posterior_precision(self) -> torch.Tensor:
        """Lambda = P^{-1} + H^T S0^{-1} H, shared by all datapoints: (Z, Z)."""
        _, cov = self.prior_moments()
        H = torch.cat([self.B, torch.zeros(self.data_size, self.latent_size_2, dtype=self.B.dtype)], 1)  # (D, Z)
        return torch.linalg.inv(cov) + H.T @ (H / self.var0[:, None])

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact p(z|x) = N(m, S) over the joint latent: m (B, Z), S (Z, Z)."""
        mu0, cov0 = self.prior_moments()
        cov = torch.linalg.inv(self.posterior_precision())  # (Z, Z)
        H = torch.cat([self.B, torch.zeros(self.data_size, self.latent_size_2, dtype=self.B.dtype)], 1)  # (D, Z)
        info = torch.linalg.solve(cov0, mu0) + ((x - self.b) / self.var0) @ H  # (B, Z)
        return info @ cov, cov  # S is symmetric

    def posterior_distribution(self, x: torch.Tensor) -> MultivariateNormal:
        """p(z|x) with batch shape (B,) and event shape (Z1 + Z2,)."""
        mean, cov = self.posterior(x)
        return MultivariateNormal(mean, covariance_matrix=cov.expand(x.shape[0], -1, -1))

    def top_conditional(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """p(z2|z1) = p(z2|z1, x) = N(M z1 + c, V): M (Z2, Z1), c (Z2,), V (Z2, Z2)."""
        eye2 = torch.eye(self.latent_size_2, dtype=self.A.dtype)
        V = torch.linalg.inv(eye2 + self.A.T @ (self.A / self.var1[:, None]))  # (Z2, Z2)
        M = V @ self.A.T / self.var1  # (Z2, Z1)
        return M, -M @ self.a, V

    def elbo_gaussian(self, x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """Exact ELBO of q = N(mean, cov) over the joint latent: log p(x) - KL(q || p(z|x)); (B,).

        mean (B, Z), cov (B, Z, Z) or (Z, Z).
        KL(N(mu, C) || N(m, S)) = 1/2 [tr(Lambda C) + (mu - m)^T Lambda (mu - m) - Z + log|S| - log|C|].
        """
        m, _ = self.posterior(x)
        precision = self.posterior_precision()  # (Z, Z)
        diff = mean - m  # (B, Z)
        trace = (precision * cov).sum((-2, -1))  # tr(Lambda C), both symmetric; (B,) or ()
        quad = ((diff @ precision) * diff).sum(-1)  # (B,)
        kl = 0.5 * (trace + quad - self.latent_size - torch.logdet(precision) - torch.logdet(cov))
        return self.log_marginal(x) - kl


def linear_conditional_joint(mean1: torch.Tensor, var1: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                             var2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments of q(z1) q(z2|z1) with q(z1) = N(mean1, diag var1), q(z2|z1) = N(W z1 + c, diag var2).

    z2 = W z1 + c + e, so the joint is N((mean1, W mean1 + c), [[V1, V1 W^T], [W V1, W V1 W^T + V2]]).

    Parameters
    ----------
    mean1, var1 : (B, Z1)
    weight : (Z2, Z1);  bias, var2 : (Z2,)

    Returns
    -------
    mean (B, Z1 + Z2), cov (B, Z1 + Z2, Z1 + Z2)
    """
    V1 = torch.diag_embed(var1)  # (B, Z1, Z1)
    cross = weight @ V1  # (B, Z2, Z1)
    lower = cross @ weight.T + torch.diag(var2)  # (B, Z2, Z2)
    cov = torch.cat([torch.cat([V1, cross.transpose(1, 2)], 2), torch.cat([cross, lower], 2)], 1)
    return torch.cat([mean1, mean1 @ weight.T + bias], 1), cov
