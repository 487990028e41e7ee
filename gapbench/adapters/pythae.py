"""pythae's VAE-family models as gapbench's model + encoder (``pip install gapbench[pythae]``).

    model, encoder = gapbench.adapters.pythae.from_pythae(pythae_model)   # in Python
    [model] factory = "gapbench.adapters.pythae:load", checkpoint = "FOLDER"   # in an experiment file

Supported: ``VAE`` and ``IWAE`` (diagonal Gaussian encoder), ``VAE_IAF`` (inverse autoregressive flow
on top of it) and ``VAE_LinNF`` (planar / radial flows). Read from pythae 0.1.2's source
(``pythae/models/vae/vae_model.py``, ``iwae``, ``vae_iaf``, ``vae_lin_nf``):

- prior: p(z) = N(0, I).
- encoder: ``encoder(x).embedding`` and ``.log_covariance`` are the mean and log-variance of
  q(z0|x) = N(mu, diag(exp(log_var))); the flow models push z0 through their flow (``iaf_flow.inverse``
  for IAF, the layers of ``net`` in order for LinNF) and have log q(zK|x) = log q(z0|x) - log|det dzK/dz0|,
  exactly the density their loss and ``get_nll`` use.
- likelihood, from ``model_config.reconstruction_loss``:
  ``"bce"``: p(x|z) = prod_d Bernoulli(x_d; r_d) with r = ``decoder(z)["reconstruction"]`` (sigmoid
  outputs), log p = -F.binary_cross_entropy(r, x) summed, the very expression pythae trains and
  evaluates (torch clamps each log at -100);
  ``"mse"``: pythae's loss 0.5 * ||x - r||^2 is -log N(x; r, I) without its constant, i.e. a Gaussian
  of unit variance in every dimension (pythae's ``get_nll`` says so and adds -D/2 log 2 pi); gapbench
  uses log N(x; r, I) with the constant, so L[q] here = -loss - D/2 log 2 pi.

pythae's training loss of the VAE uses the closed-form KL, its IAF and LinNF losses a one-sample
estimate, and the IWAE's loss is a gradient surrogate, not the bound: compare gapbench's L[q] with
``-loss`` (minus the MSE constant) on the same z, as tests/test_pythae.py does.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gapbench.errors import GapbenchError
from gapbench.models.likelihoods import gaussian_log_prob, standard_normal_log_prob
from gapbench.posteriors import DiagonalGaussian, FlowPosterior
from gapbench.posteriors.noise import standard_normal

SUPPORTED = ("VAE", "IWAE", "VAE_IAF", "VAE_LinNF")


class PythaeAdapterError(GapbenchError, ValueError):
    """A pythae model or folder this adapter cannot use; the message says what to do instead."""


def _kind(model: nn.Module) -> str:
    name = type(model).__name__
    if name not in SUPPORTED:
        raise PythaeAdapterError(f"gapbench's pythae adapter supports {', '.join(SUPPORTED)}, got {name}; its "
                                 "generative model or posterior may differ from these (write your own factory "
                                 "returning (model, encoder), see README 'Your own model')")
    return name


class PythaeModel(nn.Module):
    """The Model protocol of a pythae VAE: ``log_prior(z)``, ``log_likelihood(x, z)``, both (K, B)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        _kind(model)
        self.decoder = model.decoder
        self.input_dim = tuple(model.input_dim)
        self.reconstruction_loss = model.model_config.reconstruction_loss
        if self.reconstruction_loss not in ("bce", "mse"):
            raise PythaeAdapterError(f"unknown pythae reconstruction_loss {self.reconstruction_loss!r}; the adapter "
                                     "maps 'bce' (Bernoulli) and 'mse' (unit-variance Gaussian)")
        self.latent_size = int(model.model_config.latent_dim)

    @property
    def likelihood(self) -> str:
        """gapbench's name of the data domain: "bernoulli" (bce) or "gaussian" (mse)."""
        return "bernoulli" if self.reconstruction_loss == "bce" else "gaussian"

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I): (K, B, Z) -> (K, B)."""
        return standard_normal_log_prob(z)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) of pythae's reconstruction loss: x (B, D), z (K, B, Z) -> (K, B)."""
        k, b, latent = z.shape
        r = self.decoder(z.reshape(k * b, latent))["reconstruction"]  # (K*B, *input_dim)
        r = r.reshape(k, b, -1)  # (K, B, D)
        if self.reconstruction_loss == "bce":
            return -F.binary_cross_entropy(r, x.expand_as(r), reduction="none").sum(-1)  # (K, B)
        return gaussian_log_prob(r, 0.0, x)  # (K, B): N(x; r, I)


class PythaeFlowPosterior(FlowPosterior):
    """q(zK|x) of VAE_IAF / VAE_LinNF: z0 = mean + std * eps, zK = flow(z0),
    log q(zK) = log q(z0) - log|det dzK/dz0|. A FlowPosterior, so AIS and local refinement start
    from the diagonal Gaussian fitted to its samples, as for gapbench's own flows."""

    def __init__(self, mean: torch.Tensor, log_var: torch.Tensor, flow_fn):
        super().__init__({"mean": mean, "log_var": log_var})
        self.flow_fn = flow_fn  # z0 (N, Z) -> (zK (N, Z), log|det dzK/dz0| (N,))

    def from_noise(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (K, B, Z) and log q(z) (K, B) for base noise eps (K, B, Z)."""
        z0 = self.to_latent(eps)  # (K, B, Z)
        k, b, latent = z0.shape
        zk, log_det = self.flow_fn(z0.reshape(k * b, latent))  # (K*B, Z), (K*B,)
        return zk.reshape(k, b, latent), self.base_log_prob(eps) - log_det.reshape(k, b)

    def rsample_and_log_prob(self, num_samples: int, *, generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.from_noise(self.base_noise(num_samples, generator=generator))


class PythaeEncoder(nn.Module):
    """x (B, D) -> q(z|x): a DiagonalGaussian (VAE, IWAE) or a PythaeFlowPosterior (VAE_IAF, VAE_LinNF)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.kind = _kind(model)
        self.encoder = model.encoder
        self.input_dim = tuple(model.input_dim)
        if self.kind == "VAE_IAF":
            self.iaf_flow = model.iaf_flow
        if self.kind == "VAE_LinNF":
            self.net = model.net

    def _flow(self, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z0 (N, Z) -> zK (N, Z), log|det dzK/dz0| (N,), as pythae's forward computes them."""
        if self.kind == "VAE_IAF":
            out = self.iaf_flow.inverse(z0)  # pythae's sampling direction
            return out.out, out.log_abs_det_jac
        z, log_det = z0, torch.zeros(z0.shape[0], dtype=z0.dtype, device=z0.device)
        for layer in self.net:
            out = layer(z)
            z, log_det = out.out, log_det + out.log_abs_det_jac
        return z, log_det

    def forward(self, x: torch.Tensor):
        out = self.encoder(x.reshape(x.shape[0], *self.input_dim))
        mean, log_var = out.embedding, out.log_covariance  # (B, Z) each
        if self.kind in ("VAE", "IWAE"):
            return DiagonalGaussian(mean, log_var)
        return PythaeFlowPosterior(mean, log_var, self._flow)


def from_pythae(model: nn.Module) -> tuple[PythaeModel, PythaeEncoder]:
    """(model, encoder) for gapbench of a trained pythae VAE, IWAE, VAE_IAF or VAE_LinNF (eval mode)."""
    model.eval()
    return PythaeModel(model).eval(), PythaeEncoder(model).eval()


def load(checkpoint: str | Path) -> tuple[PythaeModel, PythaeEncoder]:
    """The factory for experiment files: a folder written by pythae's ``model.save`` (or its trainer's
    ``final_model``), with the default architectures. A folder with ``encoder.pkl`` / ``decoder.pkl``
    (custom networks, which pythae stores as cloudpickle, i.e. code run on loading) is refused: build
    such a model in your own factory and return ``from_pythae(model)``."""
    folder = Path(checkpoint)
    if not (folder / "model_config.json").is_file() or not (folder / "model.pt").is_file():
        raise PythaeAdapterError(f"{folder} is not a pythae model folder (model_config.json and model.pt); give the "
                                 "folder written by model.save(...) or the trainer's final_model")
    pickles = sorted(p.name for p in folder.glob("*.pkl"))
    if pickles:
        raise PythaeAdapterError(f"{folder} holds {', '.join(pickles)}: custom networks that pythae unpickles (which "
                                 "runs code); gapbench does not load them for you. Write a factory that builds the "
                                 "model (pythae's AutoModel.load_from_folder, if you trust the files) and returns "
                                 "gapbench.adapters.pythae.from_pythae(model)")
    try:
        from pythae.models import AutoModel
    except ImportError:
        raise PythaeAdapterError("pythae is not installed; pip install 'gapbench[pythae]'") from None
    return from_pythae(AutoModel.load_from_folder(str(folder)))


LOG_2PI = math.log(2 * math.pi)  # the constant pythae's MSE loss leaves out, per dimension, halved


def gaussian_constant(data_size: int) -> float:
    """D/2 log 2 pi: gapbench's log N(x; r, I) = -(pythae's 0.5 ||x - r||^2) - this."""
    return 0.5 * data_size * LOG_2PI
