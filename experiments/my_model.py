"""A user-defined model for ``experiments/external_example.toml``: probabilistic PCA of the digits.

The model is linear-Gaussian, p(z) = N(0, I_Z), p(x|z) = N(W z + b, sigma^2 I_D), fitted by maximum
likelihood in closed form (Tipping & Bishop, 1999, eq. 7-8): with the train split's mean b, the
eigenvalues l_1 >= ... >= l_D and eigenvectors U of its covariance,
    sigma^2 = mean(l_{Z+1}, ..., l_D),   W = U_Z (diag(l_1..l_Z) - sigma^2 I)^{1/2} R,
for any rotation R; a fixed random R makes the exact posterior p(z|x) correlated, so a diagonal
Gaussian has an approximation gap. Its log p(x), posterior and optimal diagonal Gaussian are known in
closed form (``gapbench.models.linear_gaussian``), which lets a test check a whole run.

The encoder is a plausible but suboptimal one: q(z|x) = N(W^+ (x - b), diag(S)), the least-squares
projection onto the principal subspace (which ignores the noise: the exact posterior mean is
(W^T W + sigma^2 I)^{-1} W^T (x - b)) with the posterior's marginal variances diag(S) (larger than the
optimal diagonal Gaussian's 1 / diag(S^{-1})). So the run's amortization gap is
KL(q || p(z|x)) - KL(q* || p(z|x)) > 0, in closed form too (``LinearGaussian.elbo_diagonal``).

Factories (see gapbench.runner.external): ``make()`` fits the model on gapbench's digits train split;
``load(checkpoint)`` reads W, b and sigma saved by ``python experiments/my_model.py OUT.pt``.
"""

from __future__ import annotations

import sys

import torch
from torch.distributions import Independent, Normal

from gapbench.data import load_dataset
from gapbench.models.linear_gaussian import LinearGaussian

LATENT_SIZE = 4
ROTATION_SEED = 0


def fit_ppca(x: torch.Tensor, latent_size: int = LATENT_SIZE) -> LinearGaussian:
    """Maximum-likelihood probabilistic PCA of x (N, D), in float64, rotated by a fixed random R."""
    x = x.double()
    bias = x.mean(0)  # (D,)
    covariance = torch.cov(x.T, correction=0)  # (D, D)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)  # descending
    sigma2 = eigenvalues[latent_size:].mean()
    scales = (eigenvalues[:latent_size] - sigma2).clamp_min(0).sqrt()  # (Z,)
    generator = torch.Generator().manual_seed(ROTATION_SEED)
    rotation, _ = torch.linalg.qr(torch.randn(latent_size, latent_size, generator=generator, dtype=torch.float64))
    weight = eigenvectors[:, :latent_size] * scales @ rotation  # (D, Z)
    return LinearGaussian(weight, bias, float(sigma2.sqrt()))


class ProjectionEncoder:
    """q(z|x) = N(W^+ (x - b), diag(S)): least-squares projection, the posterior's marginal variances."""

    def __init__(self, model: LinearGaussian):
        self.model = model
        self.projection = torch.linalg.pinv(model.weight)  # W^+, (Z, D)
        _, covariance = model.posterior(torch.zeros(1, model.data_size, dtype=model.weight.dtype))  # S, (Z, Z)
        self.scale = covariance.diagonal().sqrt()  # (Z,)

    def mean_and_var(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) -> mean (B, Z) and variances (B, Z), in the model's dtype (for the closed forms)."""
        mean = (x.to(self.model.weight.dtype) - self.model.bias) @ self.projection.T  # (B, Z)
        return mean, self.scale.square().expand_as(mean)

    def __call__(self, x: torch.Tensor) -> Independent:
        mean, var = self.mean_and_var(x)  # (B, Z) each
        return Independent(Normal(mean.to(x.dtype), var.sqrt().to(x.dtype)), 1)


class Float32Model:
    """The linear-Gaussian model evaluated in x's dtype (the runner's data are float32)."""

    def __init__(self, model: LinearGaussian):
        self.exact = model  # float64, for the closed forms
        self.float = LinearGaussian(model.weight.float(), model.bias.float(), model.sigma)

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        return self.float.log_prior(z)  # (K, B)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.float.log_likelihood(x, z)  # (K, B)

    @property
    def latent_size(self) -> int:  # with sample_x: what `gapbench bdmc` needs to simulate data
        return self.float.latent_size

    def sample_x(self, z: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor:
        return self.float.sample_x(z, generator=generator)  # (..., D)


def make() -> tuple[Float32Model, ProjectionEncoder]:
    """Fit PPCA on gapbench's digits train split (grey levels / 16), return (model, encoder)."""
    model = fit_ppca(load_dataset("digits").train)
    return Float32Model(model), ProjectionEncoder(model)


def load(checkpoint) -> tuple[Float32Model, ProjectionEncoder]:
    """The model saved by ``save``: a .pt file of tensors, read with torch.load(weights_only=True)."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = LinearGaussian(saved["weight"], saved["bias"], float(saved["sigma"]))
    return Float32Model(model), ProjectionEncoder(model)


def save(path: str) -> None:
    model = fit_ppca(load_dataset("digits").train)
    torch.save({"weight": model.weight, "bias": model.bias, "sigma": torch.tensor(model.sigma)}, path)


def closed_forms(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per datapoint of x (N, D): exact log p(x), L[q] of the projection encoder and L[q*] of the best
    diagonal Gaussian, and the three gaps (N,) each."""
    model = fit_ppca(load_dataset("digits").train)
    x = x.double()
    log_px = model.log_marginal(x)
    elbo_q = model.elbo_diagonal(x, *ProjectionEncoder(model).mean_and_var(x))
    elbo_q_star = model.elbo_diagonal(x, *model.optimal_diagonal(x))
    return {"log p(x)": log_px, "L[q*_FFG]": elbo_q_star, "L[q]": elbo_q,
            "approximation gap": log_px - elbo_q_star, "amortization gap": elbo_q_star - elbo_q,
            "inference gap": log_px - elbo_q}


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "closed-form":  # python experiments/my_model.py closed-form SPLIT N
        split, n = sys.argv[2], int(sys.argv[3])
        for name, value in closed_forms(load_dataset("digits").split(split)[:n]).items():
            print(f"{name:18s} {float(value.mean()):8.3f}")
    else:  # python experiments/my_model.py OUT.pt: save the fitted model for load(checkpoint)
        save(sys.argv[1] if len(sys.argv) > 1 else "ppca_digits.pt")
