"""Encoders (amortized posteriors): the FFG encoder, and the registry of every family's encoder."""

from __future__ import annotations

import torch
from torch import nn

from gapbench.models.mlp import mlp
from gapbench.posteriors.coupling import AuxiliaryFlowEncoder
from gapbench.posteriors.gaussian import DiagonalGaussian
from gapbench.posteriors.iaf import IAFEncoder
from gapbench.posteriors.planar import PlanarFlowEncoder


class GaussianEncoder(nn.Module):
    """q(z|x) = N(mu(x), diag(exp(log_var(x)))), mu and log_var from one MLP.

    Parameters
    ----------
    data_size : D
    latent_size : Z
    hidden_sizes : hidden widths from x towards z (paper: (200, 200))
    activation : nonlinearity name (paper: "elu")
    trunk : a module mapping x (B, D) to features (B, F), with attribute ``feature_size`` (F),
        followed by one linear layer to (mu, log_var) instead of the MLP (e.g.
        ``gapbench.models.conv.ConvTrunk``); ``hidden_sizes`` is then unused
    """

    def __init__(self, data_size: int, latent_size: int, hidden_sizes: tuple[int, ...] = (200, 200),
                 activation: str = "elu", *, trunk: nn.Module | None = None):
        super().__init__()
        self.data_size = data_size
        self.latent_size = latent_size
        if trunk is not None:
            self.net = nn.Sequential(trunk, nn.Linear(int(trunk.feature_size), 2 * latent_size))
        else:
            self.net = mlp([data_size, *hidden_sizes, 2 * latent_size], activation)

    def forward(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, D) -> DiagonalGaussian with mean and log_var of shape (B, Z)."""
        mean, log_var = self.net(x).chunk(2, dim=-1)  # (B, Z) each
        return DiagonalGaussian(mean, log_var)


ENCODERS: dict[str, type[nn.Module]] = {
    "ffg": GaussianEncoder, "flow": AuxiliaryFlowEncoder, "planar": PlanarFlowEncoder, "iaf": IAFEncoder,
}


def make_encoder(posterior: str, data_size: int, latent_size: int, hidden_sizes: tuple[int, ...] = (200, 200),
                 activation: str = "elu", *, num_steps: int | None = None, flow_hidden: int | None = None,
                 trunk: nn.Module | None = None) -> nn.Module:
    """The encoder of family ``posterior`` (``"ffg"``, ``"flow"``, ``"planar"``, ``"iaf"``).

    ``num_steps``: coupling or IAF steps, or planar layers (None: 2, 2 and 10); ``flow_hidden``: the
    width of the coupling and MADE networks (None: 100). The FFG encoder takes neither. ``trunk``:
    the features of x for every family instead of the MLP of ``hidden_sizes`` (e.g. a ConvTrunk).
    """
    if posterior not in ENCODERS:
        raise ValueError(f"unknown encoder family {posterior!r}; choose one of {sorted(ENCODERS)}")
    if posterior == "ffg":
        return GaussianEncoder(data_size, latent_size, hidden_sizes, activation, trunk=trunk)
    if posterior == "planar":
        return PlanarFlowEncoder(data_size, latent_size, hidden_sizes, activation, num_layers=num_steps or 10,
                                 trunk=trunk)
    return ENCODERS[posterior](data_size, latent_size, hidden_sizes, activation,  # type: ignore[call-arg]
                              num_steps=num_steps or 2, flow_hidden=flow_hidden or 100, trunk=trunk)
