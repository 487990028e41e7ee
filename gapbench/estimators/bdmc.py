"""Bidirectional Monte Carlo (BDMC): a sandwich around log p(x) on data simulated from the model.

For (z, x) drawn from the model, z ~ p(z) and x ~ p(x|z), z is an exact sample of the posterior
p(z|x). Forward AIS from q to p(z|x) gives a stochastic lower bound on log p(x); reverse AIS started
at that exact z and annealed back to q gives a stochastic upper bound. The true log p(x) lies
between them (in expectation), so the gap upper - lower bounds the error of forward AIS on such
data (Grosse, Ghahramani & Adams, 2015, "Sandwiching the marginal likelihood using bidirectional
Monte Carlo"; Grosse, Ancha & Roy, 2016, "Measuring the reliability of MCMC inference with
bidirectional Monte Carlo"; Wu et al., 2017, use it to validate AIS on VAE decoders). A small gap
at some AIS settings is evidence that the same settings are accurate on real data of the same
model, as long as real data resemble simulated data.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch.distributions import Distribution

from gapbench.posteriors import Posterior
from gapbench.estimators.ais import DEFAULT_AIS, AISEstimate, AISProcedure, ais, reverse_ais


class BDMCEstimate(NamedTuple):
    """Both sides of the sandwich, per datapoint.

    Attributes
    ----------
    lower : forward AIS (stochastic lower bound), value (B,)
    upper : reverse AIS (stochastic upper bound), value (B,)
    gap : (B,) float64, upper.value - lower.value
    """

    lower: AISEstimate
    upper: AISEstimate
    gap: torch.Tensor


def simulate(model, num_datapoints: int, *, latent_size: int | None = None,
             generator: torch.Generator | None, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw (x, z) from the model: z ~ p(z) (``model.sample_prior(shape, generator=...)`` where the model
    has it, else N(0, I)), x ~ p(x|z) with ``model.sample_x``.

    Returns
    -------
    x : (N, D)
    z : (N, Z), an exact posterior sample for each x
    """
    latent_size = latent_size or getattr(model, "latent_size", None)
    if latent_size is None:
        raise ValueError("simulate needs latent_size= (the model has no latent_size attribute)")
    if not callable(getattr(model, "sample_x", None)):
        raise TypeError(f"{type(model).__name__} cannot simulate data: it needs sample_x(z, *, generator)")
    sample_prior = getattr(model, "sample_prior", None)
    if callable(sample_prior):  # a prior that is not N(0, I), e.g. a two-layer model's p(z2) p(z1|z2)
        z = sample_prior((num_datapoints,), generator=generator, dtype=dtype)  # (N, Z)
    else:
        z = torch.randn(num_datapoints, latent_size, generator=generator, dtype=dtype)  # (N, Z)
    return model.sample_x(z, generator=generator), z


def bdmc(model, x: torch.Tensor, z: torch.Tensor, *, init: Posterior | Distribution | None = None,
         procedure: AISProcedure = DEFAULT_AIS, generator: torch.Generator | None,
         callback: Callable[[int], None] | None = None) -> BDMCEstimate:
    """Forward and reverse AIS with the same settings on simulated pairs (x, z).

    Parameters
    ----------
    model : ``log_prior``, ``log_likelihood`` (and ``sample_x`` to simulate the data)
    x : (B, D) simulated data
    z : (B, Z) the latents that generated x (exact posterior samples)
    init : q(z) for both directions (None: the prior)
    procedure : the AIS settings of both directions (:class:`~gapbench.estimators.ais.AISProcedure`)
    generator, callback : as :func:`gapbench.estimators.ais`, shared by both directions (forward first)

    Returns
    -------
    :class:`BDMCEstimate`; E[lower] <= log p(x) <= E[upper] for every datapoint.
    """
    lower = ais(model, x, init=init, procedure=procedure, latent_size=z.shape[-1], generator=generator,
                callback=callback)
    upper = reverse_ais(model, x, z.to(x.dtype), init=init, procedure=procedure, generator=generator,
                        callback=callback)
    return BDMCEstimate(lower, upper, upper.value - lower.value)
