"""The Python API: measure the gaps of any model and encoder on a batch of datapoints.

    frame, summary = gapbench.measure_gaps(model, encoder, x)

``model`` needs ``log_prior(z) -> (K, B)`` and ``log_likelihood(x, z) -> (K, B)``; ``encoder`` maps
x (B, D) to a torch Distribution over z with batch shape (B,) and event shape (Z,) (or a gapbench
Posterior). The stages are also public so that a runner can checkpoint between them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import pandas as pd
import torch

from gapbench import estimators
from gapbench.data import check_finite
from gapbench.estimators import AISEstimate, AISProcedure, Estimate, elbo_from_stats, iwae_from_stats, weight_stats
from gapbench.estimators.ais import DEFAULT_AIS
from gapbench.gaps import gap_frame, summarize
from gapbench.estimators.log_px import selected_log_px
from gapbench.posteriors import (DatapointStreams, DiagonalGaussian, FlowFamily, FlowPosterior, HierarchicalFamily,
    HierarchicalPosterior, LocalFamily, RandomStream, as_posterior, get_family)
from gapbench.inference.frozen import amortized_posterior, frozen
from gapbench.inference.refine import RefineResult, refine

INITS = ("prior", "encoder")
AIS_INITS = ("prior", "encoder", "q_star")


class RefineProcedure(NamedTuple):
    """Settings of local refinement; the fields are the keyword arguments of ``gapbench.inference.refine``.

    The defaults are gapbench's procedure: a large step size that is halved whenever a paired
    (common-random-number) test finds no improvement of the window-averaged iterate, so a datapoint
    travels fast and still ends close to its optimum (see ``gapbench.inference.refine`` for the rule and
    ``gapbench bench refine`` for how it compares with the paper's). :meth:`paper` gives Cremer,
    Li & Duvenaud (2018)'s.
    """

    num_samples: int = 10  # z samples per datapoint per step
    learning_rate: float = 0.2  # initial Adam step size (halved after each bad check)
    max_steps: int = 5000  # hard limit per datapoint
    check_every: int = 50  # steps per convergence window
    patience: int = 4  # consecutive bad windows that stop a datapoint
    lr_decay: float = 0.5  # learning-rate factor after a bad window
    min_improvement: float = 0.0  # nats a window must gain to count as better
    gradient: str = "stl"  # "stl" (sticking the landing) or "reparam"
    convergence: str = "paired"  # "paired" (common random numbers against the anchor) or "window"
    check_samples: int = 100  # noise draws per paired check

    @classmethod
    def for_flows(cls) -> "RefineProcedure":
        """gapbench's procedure for flow families: step size 0.1 and 100-step windows. A flow's
        parameters interact (its networks and, for the auxiliary flow, q(v|.) against r(v|.)); with
        the FFG's step size 0.2 and 50-step windows the first large steps knock the auxiliary flow
        below its start and the paired test stops it there (on the linear-Gaussian model of
        tests/test_flows.py it closed 0.31 of the FFG's approximation gap, against 0.85 with these)."""
        return cls(learning_rate=0.1, check_every=100)

    @classmethod
    def paper(cls) -> "RefineProcedure":
        """The 2018 code: Adam 1e-3, 50 samples, checks every 100 steps, stop after >10 bad checks."""
        return cls(num_samples=50, learning_rate=1e-3, max_steps=10**6, check_every=100, patience=11,
                   lr_decay=1.0, min_improvement=0.0, gradient="reparam", convergence="window")


DEFAULT_PROCEDURE = RefineProcedure()


class BoundPair(NamedTuple):
    """ELBO and IWAE of one posterior, from the same K samples."""

    elbo: Estimate
    iwae: Estimate


def bounds_of(model, posterior, x: torch.Tensor, *, num_samples: int, chunk_size: int | None,
              generator: RandomStream | None) -> BoundPair:
    """ELBO and IWAE-K of ``posterior`` from one pass of K samples per datapoint."""
    stats = weight_stats(model, posterior, x, num_samples=num_samples, chunk_size=chunk_size,
                         generator=generator)
    return BoundPair(elbo_from_stats(stats), iwae_from_stats(stats))


def check_data(model, x: torch.Tensor, name: str = "x") -> None:
    """DataError unless x holds no NaN or infinity and, where the model has ``check_data(x, name)``
    (a gapbench Decoder does: its Bernoulli likelihood needs 0s and 1s), the model accepts it."""
    check_finite(x, name)
    model_check = getattr(model, "check_data", None)
    if callable(model_check):
        model_check(x, name)


def resolve_family(family: str | LocalFamily) -> LocalFamily:
    """A family by name (default sizes) or the instance given."""
    return get_family(family) if isinstance(family, str) else family


def effective_procedure(family: str | LocalFamily, procedure: RefineProcedure | None = None) -> RefineProcedure:
    """The procedure ``family`` is refined with. ``None`` takes gapbench's default for the family
    (:class:`RefineProcedure` for the FFG and the hierarchical family, :meth:`RefineProcedure.for_flows`
    for flows). The "sticking
    the landing" gradient needs log q at the sampled z with the parameters held fixed: the FFG and the
    auxiliary flow (closed-form inverse) have it; planar flows (an iterative inverse) and IAF (Z
    sequential passes) would pay too much for it, so they take the plain reparameterisation gradient."""
    local = resolve_family(family)
    if procedure is None:
        procedure = DEFAULT_PROCEDURE if local.name in ("ffg", "hierarchical") else RefineProcedure.for_flows()
    if procedure.gradient == "stl" and not local.supports_stl:
        return procedure._replace(gradient="reparam")
    return procedure


def _fitting_noise(generator: RandomStream | None) -> RandomStream | None:
    """The noise of :func:`fit_diagonal`: with per-datapoint streams, streams forked from each datapoint's
    (so the fit does not depend on the batch); otherwise ``generator`` itself."""
    return generator.fork() if isinstance(generator, DatapointStreams) else generator


def fit_diagonal(posterior, *, num_samples: int = 1000, generator: RandomStream | None) -> DiagonalGaussian:
    """The diagonal Gaussian with the sample mean and variance of ``posterior``'s z: (B, Z) each."""
    with torch.no_grad():
        z, _ = posterior.rsample_and_log_prob(num_samples, generator=generator)  # (K, B, Z)
    return DiagonalGaussian(z.mean(0), torch.log(z.var(0)))


def starting_point(family: LocalFamily, q, *, generator: RandomStream | None):
    """What a local ``family`` starts from when it starts from the encoder's output ``q``: q itself when
    it is of the family (a flow encoder's output becomes per-datapoint parameters, the same
    distribution) or a diagonal Gaussian (the flow at the identity on top of it); otherwise the
    diagonal Gaussian fitted to q's samples (e.g. an FFG started from a flow encoder)."""
    if isinstance(family, FlowFamily) and isinstance(q, family.posterior_type):
        return q
    if isinstance(family, HierarchicalFamily) and isinstance(q, HierarchicalPosterior):
        return q  # a two-layer encoder's q(z1|x) q(z2|z1) becomes per-datapoint parameters, the same distribution
    if isinstance(q, DiagonalGaussian):
        return q
    return fit_diagonal(q, generator=_fitting_noise(generator))


def local_posterior(model, encoder: Callable, x: torch.Tensor, *, family: str | LocalFamily = "ffg",
                    init: str = "prior", procedure: RefineProcedure | None = None,
                    generator: RandomStream | None,
                    callback: Callable[[int, int], None] | None = None,
                    init_from: DiagonalGaussian | None = None) -> RefineResult:
    """Refine a local posterior of ``family`` for every datapoint of x (B, D), all at once.

    ``init="prior"`` starts from N(0, I) (as the paper), flows at the identity; ``init="encoder"``
    from the encoder's output (see :func:`starting_point`); ``init_from`` (B datapoints' diagonal
    Gaussians, e.g. the local FFG's q*) replaces either: a flow starts at the identity on top of it.
    ``procedure`` (None: the family's default) is adjusted by :func:`effective_procedure`. Random
    initial flow weights come from ``generator``.
    """
    if init not in INITS:
        raise ValueError(f"unknown refinement init {init!r}; choose one of {INITS}")
    local = resolve_family(family)
    procedure = effective_procedure(local, procedure)
    q = amortized_posterior(encoder, x)
    probe = torch.Generator(device=x.device).manual_seed(0)  # fixed: leaves the caller's stream alone
    z, _ = q.rsample_and_log_prob(1, generator=probe)  # (1, B, Z), shape probe
    fit = generator if isinstance(generator, DatapointStreams) else probe  # forked there, only when it fits
    if init_from is None and init == "encoder":
        init_from = starting_point(local, q, generator=fit)
    init_params = local.init_params(x.shape[0], z.shape[-1], like=z.detach(), init_from=init_from,
                                    generator=generator)
    with frozen(model):
        return refine(model, x, family=local, init_params=init_params, **procedure._asdict(),
                      generator=generator, callback=callback)


def ais_of(model, x: torch.Tensor, *, init: str = "encoder", encoder: Callable | None = None,
           q_star=None, procedure: AISProcedure = DEFAULT_AIS, chunk_size: int | None = None,
           generator: RandomStream | None, callback: Callable[[int], None] | None = None) -> AISEstimate:
    """Forward AIS for every datapoint of x (B, D), started from the prior, the encoder's posterior
    or the refined q* (``init`` = "prior", "encoder", "q_star"), with the model's parameters frozen;
    ``chunk_size`` chains have their gradients evaluated together (None: about 4096 rows)."""
    if init not in AIS_INITS:
        raise ValueError(f"unknown AIS init {init!r}; choose one of {AIS_INITS}")
    if init == "encoder":
        if encoder is None:
            raise ValueError("AIS init='encoder' needs the encoder")
        q = amortized_posterior(encoder, x)
    elif init == "q_star":
        if q_star is None:
            raise ValueError("AIS init='q_star' needs the refined posterior q_star")
        q = q_star
    else:
        q = None
    if isinstance(q, FlowPosterior):
        # HMC needs the gradient of log q(z) at every leapfrog step: the auxiliary flow has no tractable
        # marginal q(z), planar flows and IAF only an iterative inverse. AIS is unbiased from any initial
        # distribution, so a flow's chains start from the diagonal Gaussian fitted to its samples.
        per_datapoint = isinstance(generator, DatapointStreams)  # then forked, so the fit is the datapoint's own
        q = fit_diagonal(q, generator=_fitting_noise(generator) if per_datapoint
                         else torch.Generator(device=x.device).manual_seed(0))
    with frozen(model):
        return estimators.ais(model, x, init=q, procedure=procedure, chunk_size=chunk_size, generator=generator,
                              callback=callback)


def fresh_estimators(model, x: torch.Tensor, *, encoder: Callable,
                     q_stars: dict[str, tuple[LocalFamily, dict[str, torch.Tensor]]], num_samples: int,
                     chunk_size: int | None, ais: dict | None,
                     streams: Callable[[str, torch.Tensor], RandomStream | None]) -> dict[str, Callable]:
    """The fresh estimators of ``gapbench.estimators.log_px.fresh_estimate`` for the datapoints of x (B, D), each
    taking positions (n,) into x: "iwae_q", IWAE-K under the encoder's q; for every name of ``q_stars``
    (e.g. "iwae_q_star_ffg": (family, its q* parameters, (B, ...) each)), IWAE-K under that q*; with ``ais``
    (the keyword arguments of :func:`ais_of` but ``generator``, where ``q_star`` is a name of ``q_stars``
    or None), "ais". ``streams(name, positions)`` gives the random stream of a candidate's draw for those
    datapoints, independent of the pilot's."""
    def restricted(name: str, positions: torch.Tensor):
        family, params = q_stars[name]
        return family.posterior({k: v[positions.to(v.device)] for k, v in params.items()})

    def iwae_under(name: str) -> Callable:
        def estimate(positions: torch.Tensor) -> Estimate:
            part = x[positions.to(x.device)]
            q = amortized_posterior(encoder, part) if name == "iwae_q" else restricted(name, positions)
            return iwae_from_stats(weight_stats(model, q, part, num_samples=num_samples, chunk_size=chunk_size,
                                                generator=streams(name, positions)))
        return estimate

    fns = {name: iwae_under(name) for name in ("iwae_q", *q_stars)}
    if ais is not None:
        def by_ais(positions: torch.Tensor) -> Estimate:
            start = dict(ais)
            if start.get("q_star") is not None:
                start["q_star"] = restricted(start["q_star"], positions)
            estimate = ais_of(model, x[positions.to(x.device)], **start, generator=streams("ais", positions))
            return Estimate(estimate.value, estimate.stderr, estimate.ess)
        fns["ais"] = by_ais
    return fns


def ais_diagnostics(estimate: AISEstimate) -> dict[str, torch.Tensor]:
    """The per-datapoint AIS diagnostics as columns: acceptance rate, final step size, divergences."""
    return {"ais_acceptance_rate": estimate.acceptance_rate, "ais_step_size": estimate.step_size,
            "ais_divergence_rate": estimate.divergence_rate}


def measure_gaps(model, encoder: Callable, x: torch.Tensor, *, family: str | LocalFamily = "ffg", init: str = "prior",
                 num_samples: int = 5000, chunk_size: int | None = None,
                 procedure: RefineProcedure | None = None, ais: AISProcedure | None = None,
                 ais_init: str = "encoder",
                 generator: RandomStream | None = None) -> tuple[pd.DataFrame, dict]:
    """Estimate L[q], L[q*], log p_hat(x) and the gaps for every datapoint of x.

    Parameters
    ----------
    model : ``log_prior(z) -> (K, B)``, ``log_likelihood(x, z) -> (K, B)``
    encoder : x (B, D) -> Distribution (batch (B,), event (Z,)) or gapbench Posterior
    x : (B, D), finite; 0s and 1s for a model with a Bernoulli likelihood (DataError otherwise, see
        :func:`check_data`)
    family : local variational family for q*: "ffg", "flow" (Cremer et al., 2018), "planar", "iaf", or
        a LocalFamily instance (e.g. ``gapbench.posteriors.make_family("flow", hidden_size=50)``, or
        ``gapbench.posteriors.HierarchicalFamily(Z1, Z2, hidden)`` for a two-layer model's q(z1|x) q(z2|z1))
    init : where refinement starts, "prior" (the paper) or "encoder"
    num_samples : samples for every final ELBO and IWAE (paper: 5000)
    chunk_size : samples per chunk in the estimators (None: automatic)
    procedure : refinement settings (None: gapbench's default for the family, see ``effective_procedure``)
    ais : AIS settings (e.g. ``gapbench.AISProcedure()``); None (the default) runs no AIS
    ais_init : where the AIS chains start: "prior", "encoder" or "q_star" (the refined posterior; a
        posterior without a tractable density starts from its fitted diagonal Gaussian, see :func:`ais_of`)
    generator : random stream; None makes a fresh one seeded with 0

    Returns
    -------
    frame : one row per datapoint: elbo_q, elbo_q_star, iwae_q, iwae_q_star and, with ``ais``, ais
        (each with _stderr and _ess; AIS also with _acceptance_rate, _step_size, _divergence_rate),
        log_px (with _stderr and _ess: a fresh draw of the estimator chosen per datapoint on those
        pilot bounds, see ``gapbench.estimators.log_px``; a stochastic lower bound) with log_px_source (the estimator
        it comes from) and max_pilot_bound (the maximum of the pilot bounds: a diagnostic, biased upward,
        in no gap), the three gaps,
        refine_steps, refine_converged, refine_diverged, and fault ("ok", or the numerical faults:
        a bound that is NaN or infinite, a refinement that diverged)
    summary : {"bounds": ..., "gaps": ..., "faults": ...}, each bound and gap {mean, stderr, mc_stderr,
        num_datapoints} over the datapoints without faults; faults {num_datapoints, num_faulty, counts}
    """
    check_data(model, x)
    if generator is None:
        generator = torch.Generator(device=x.device).manual_seed(0)
    q = amortized_posterior(encoder, x)
    amortized = bounds_of(model, q, x, num_samples=num_samples, chunk_size=chunk_size, generator=generator)
    result = local_posterior(model, encoder, x, family=family, init=init, procedure=procedure,
                             generator=generator)
    q_star = resolve_family(family).posterior(result.params)
    local = bounds_of(model, q_star, x, num_samples=num_samples, chunk_size=chunk_size, generator=generator)
    bounds = {"elbo_q": amortized.elbo, "elbo_q_star": local.elbo, "iwae_q": amortized.iwae,
              "iwae_q_star": local.iwae}
    extra: dict = {"refine_steps": result.num_steps, "refine_converged": result.is_converged,
                   "refine_diverged": result.is_diverged}
    ais_start = None
    if ais is not None:
        estimate = ais_of(model, x, init=ais_init, encoder=encoder, q_star=q_star, procedure=ais, generator=generator)
        bounds["ais"] = estimate
        extra.update(ais_diagnostics(estimate))
        ais_start = {"init": ais_init, "encoder": encoder, "q_star": "iwae_q_star" if ais_init == "q_star" else None,
                     "procedure": ais}
    fresh = fresh_estimators(
        model, x, encoder=encoder, q_stars={"iwae_q_star": (resolve_family(family), result.params)},
        num_samples=num_samples, chunk_size=chunk_size, ais=ais_start,
        streams=lambda name, positions: generator.select(positions) if isinstance(generator, DatapointStreams)
        else generator)
    candidates = tuple(n for n in bounds if n.startswith(("iwae", "ais")))
    frame = gap_frame(bounds, log_px=lambda pilot: selected_log_px(pilot, candidates, fresh), extra=extra)
    return frame, summarize(frame)
