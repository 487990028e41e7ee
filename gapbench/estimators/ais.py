"""Annealed importance sampling (AIS) with HMC transitions, forward and reverse.

Between an initial distribution q(z) (the prior, or an amortized or refined posterior) and the
posterior p(z|x), AIS moves through the geometric path

    log f_t(z) = (1 - beta_t) log q(z) + beta_t log p(x, z),   0 = beta_0 < beta_1 < ... < beta_T = 1

(from the prior: log p(z) + beta_t log p(x|z)). A chain starts at z_0 ~ q, and for t = 1..T adds
(beta_t - beta_{t-1}) (log p(x, z_{t-1}) - log q(z_{t-1})) to its log-weight, then moves z with an
HMC transition that leaves f_t invariant (none after the last). Each chain's weight w is an
unbiased estimate of p(x) (Neal, 2001, "Annealed importance sampling"), so with C chains

    AIS = log (1/C) sum_c w_c   (B,),  E[AIS] <= log p(x),

a stochastic lower bound. Run from an exact posterior sample with the schedule reversed (beta from
1 to 0), the same weights estimate 1 / p(x), so -log (1/C) sum_c w_c is a stochastic upper bound
(reverse AIS; Grosse, Ghahramani & Adams, 2015, "Sandwiching the marginal likelihood using
bidirectional Monte Carlo"; Grosse et al., 2016). Wu, Burda, Salakhutdinov & Grosse (2017), "On the
quantitative analysis of decoder-based generative models", use AIS with HMC this way for VAEs and
validate it with BDMC: the prior as initial distribution, thousands of intermediate distributions,
HMC with 10 leapfrog steps and a step size adapted toward an acceptance rate of 0.65.

The shape follows BlackJAX, as ``gapbench.estimators.hmc`` does: :func:`ais_init` builds an
:class:`AISState` (positions, log-weights, step sizes), :func:`ais_step` is one annealing step (the
incremental weight, then one HMC transition) and :func:`adapt_step_size` the step-size update; the
driver :func:`anneal` loops over the schedule and returns the diagnostics as an :class:`AISInfo`.
:func:`ais` and :func:`reverse_ais` start the chains and turn the weights into an
:class:`AISEstimate`. Their settings are one :class:`AISProcedure`.

Implementation: all datapoints x chains move together as one (C, B, Z) batch; log-weights are
accumulated in float64; no autograd graph outlives a step (``hmc.value_and_grad`` differentiates a
fresh leaf), and only the current positions, weights and per-chain step sizes are kept, so memory
does not grow with T. The step sizes (one per chain) adapt after every transition,
log eps <- log eps + rate * (acceptance probability - target), clamped to [min, max]. By default the
chains of a datapoint share one step size, adapted from their mean acceptance probability
(``adaptation="datapoint"``). Letting each chain adapt from its own acceptance
(``adaptation="chain"``) makes a chain's kernel depend on where that chain has been, which the
exactness argument of AIS does not allow: on a linear-Gaussian model (D = 10, Z = 2, 200
datapoints, 16 chains, T = 200) it pushed forward AIS 0.06 +- 0.015 nats *above* the exact log p(x)
and reverse AIS 0.09 +- 0.035 below it, breaking the sandwich; shared adaptation showed no such
bias. With faster adaptation (rate 1, 500 datapoints, T = 100, 5 leapfrog steps) per-chain
adaptation lands 0.146 +- 0.013 nats above log p(x) and shared adaptation 0.019 +- 0.015 below it
(tests/test_ais.py). ``adaptation_rate=0`` fixes the step sizes (AIS exactly as
analysed by Neal, 2001).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch.distributions import Distribution

from gapbench.posteriors import (DiagonalGaussian, DistributionPosterior, Posterior, RandomStream, as_posterior,
    random_normal)
from gapbench.estimators.hmc import HMCInfo, HMCState, hmc_step
from gapbench.estimators.iwae import iwae_from_stats
from gapbench.estimators.log_weights import DEFAULT_ROWS_PER_CHUNK, empty_stats

SCHEDULES = ("linear", "sigmoid")
ADAPTATIONS = ("datapoint", "chain")
SIGMOID_RADIUS = 4.0  # delta of the sigmoid schedule (Grosse, Ghahramani & Adams, 2015)


class AISProcedure(NamedTuple):
    """Settings of AIS with HMC, the one place for their defaults: :func:`ais`, :func:`reverse_ais`,
    :func:`anneal` and ``gapbench.bdmc`` take them as ``procedure=``. The field names are the config's
    ``[ais]`` keys (and ``gapbench bdmc``'s flags), which default to them. The defaults are gapbench's;
    :meth:`paper` is the scale of Cremer, Li & Duvenaud (2018) (100 chains, 10000 annealing steps;
    Wu et al., 2017: 10 leapfrog steps, acceptance target 0.65)."""

    num_chains: int = 16  # C, chains (importance samples) per datapoint
    num_steps: int = 500  # T, annealing steps (T - 1 intermediate distributions, one HMC transition each)
    schedule: str = "sigmoid"  # spacing of the betas: "linear" or "sigmoid"
    num_leapfrog: int = 10  # L, leapfrog steps per HMC transition
    target_acceptance: float = 0.65  # acceptance probability the step sizes are adapted toward
    step_size: float = 0.05  # initial step size
    adaptation: str = "datapoint"  # "datapoint": the chains of a datapoint share a step size; "chain": each its own
    adaptation_rate: float = 0.1  # log step-size change per unit of acceptance error (0: fixed step sizes)
    min_step_size: float = 1e-4  # clamp of the adapted step sizes
    max_step_size: float = 0.5

    @classmethod
    def paper(cls) -> "AISProcedure":
        return cls(num_chains=100, num_steps=10000)


DEFAULT_AIS = AISProcedure()


def check_procedure(procedure: AISProcedure) -> None:
    """Raise ValueError naming the first setting of ``procedure`` that AIS cannot run with."""
    if procedure.num_chains < 1:
        raise ValueError(f"num_chains must be at least 1, got {procedure.num_chains}")
    if procedure.num_steps < 1:
        raise ValueError(f"num_steps (annealing steps) must be at least 1, got {procedure.num_steps}")
    if procedure.schedule not in SCHEDULES:
        raise ValueError(f"unknown annealing schedule {procedure.schedule!r}; choose one of {SCHEDULES}")
    if procedure.num_leapfrog < 1:
        raise ValueError(f"num_leapfrog must be at least 1, got {procedure.num_leapfrog}")
    if not 0.0 < procedure.target_acceptance < 1.0:
        raise ValueError(f"target_acceptance must lie in (0, 1), got {procedure.target_acceptance}")
    if not 0.0 < procedure.min_step_size <= procedure.step_size <= procedure.max_step_size:
        raise ValueError(f"need 0 < min_step_size <= step_size <= max_step_size, got {procedure.min_step_size}, "
                         f"{procedure.step_size}, {procedure.max_step_size}")
    if procedure.adaptation not in ADAPTATIONS:
        raise ValueError(f"unknown step-size adaptation {procedure.adaptation!r}; choose one of {ADAPTATIONS}")
    if procedure.adaptation_rate < 0:
        raise ValueError(f"adaptation_rate must be >= 0, got {procedure.adaptation_rate}")


class AISState(NamedTuple):
    """The chains between two annealing steps.

    Attributes
    ----------
    z : (C, B, Z) positions
    log_weights : (C, B) float64 log w accumulated so far
    log_step_size : (C, B) log of each chain's HMC step size
    """

    z: torch.Tensor
    log_weights: torch.Tensor
    log_step_size: torch.Tensor


class AISInfo(NamedTuple):
    """Diagnostics of a whole annealing run, per chain, each (C, B).

    Attributes
    ----------
    acceptance_rate : mean HMC acceptance probability over the transitions
    step_size : the final adapted step sizes
    divergence_rate : fraction of transitions flagged divergent
    """

    acceptance_rate: torch.Tensor
    step_size: torch.Tensor
    divergence_rate: torch.Tensor


class AISEstimate(NamedTuple):
    """AIS estimate of log p(x) (forward) or its reverse-AIS upper bound, per datapoint.

    The first three fields are those of :class:`~gapbench.estimators.Estimate`.

    Attributes
    ----------
    value : (B,) float64; forward: log mean_c w_c, a stochastic lower bound on log p(x); reverse:
        -log mean_c w_c, a stochastic upper bound
    stderr : (B,) delta-method standard error sqrt(1/ESS - 1/C), as for IWAE
    ess : (B,) (sum w)^2 / sum w^2 of the final weights, in [1, C]
    acceptance_rate : (B,) mean HMC acceptance probability over chains and transitions
    step_size : (B,) mean over chains of the final adapted step sizes
    divergence_rate : (B,) fraction of transitions flagged divergent
    log_weights : (C, B) float64 log w of every chain
    z : (C, B, Z) the chains' final positions (forward: approximate posterior samples)
    """

    value: torch.Tensor
    stderr: torch.Tensor
    ess: torch.Tensor
    acceptance_rate: torch.Tensor
    step_size: torch.Tensor
    divergence_rate: torch.Tensor
    log_weights: torch.Tensor
    z: torch.Tensor


def annealing_schedule(num_annealing_steps: int, schedule: str = "linear", *,
                       radius: float = SIGMOID_RADIUS) -> torch.Tensor:
    """beta_0 = 0 < beta_1 < ... < beta_T = 1 as a (T + 1,) float64 tensor, T = ``num_annealing_steps``.

    ``"linear"``: beta_t = t / T. ``"sigmoid"``: beta~_t = sigmoid(radius (2 t / T - 1)), rescaled
    so the ends are 0 and 1; it spends more steps near both ends (Grosse, Ghahramani & Adams, 2015).
    """
    if num_annealing_steps < 1:
        raise ValueError(f"num_steps (annealing steps) must be at least 1, got {num_annealing_steps}")
    t = torch.arange(num_annealing_steps + 1, dtype=torch.float64) / num_annealing_steps  # (T + 1,)
    if schedule == "linear":
        return t
    if schedule == "sigmoid":
        s = torch.sigmoid(radius * (2.0 * t - 1.0))  # (T + 1,)
        betas = (s - s[0]) / (s[-1] - s[0])
        betas[0], betas[-1] = 0.0, 1.0
        return betas
    raise ValueError(f"unknown annealing schedule {schedule!r}; choose one of {SCHEDULES}")


def _log_prob_fn(posterior: Posterior) -> Callable[[torch.Tensor], torch.Tensor]:
    """log q(z) for z (C, B, Z) -> (C, B), for the Posteriors that have a density."""
    if isinstance(posterior, DiagonalGaussian):
        return posterior.log_prob
    if isinstance(posterior, DistributionPosterior):
        return posterior.distribution.log_prob
    if callable(getattr(posterior, "log_prob", None)):
        return posterior.log_prob
    raise TypeError(f"AIS needs the initial distribution's log density; {type(posterior).__name__} has no log_prob")


class AnnealingPath(NamedTuple):
    """The geometric path log f_beta(z) = base(z) + beta * delta(z), both (C, B)."""

    base_fn: Callable[[torch.Tensor], torch.Tensor]  # log q(z) (the prior: log p(z))
    delta_fn: Callable[[torch.Tensor], torch.Tensor]  # log p(x, z) - log q(z) (the prior: log p(x|z))

    def logdensity_fn(self, beta: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """z (C, B, Z) -> log f_beta(z) (C, B)."""
        return lambda z: self.base_fn(z) + beta * self.delta_fn(z)


def annealing_path(model, x: torch.Tensor, log_init_fn: Callable | None) -> AnnealingPath:
    """The path from q (``log_init_fn``; None: the prior) to p(z|x) for the datapoints x (B, D)."""
    if log_init_fn is None:
        return AnnealingPath(model.log_prior, lambda z: model.log_likelihood(x, z))
    return AnnealingPath(log_init_fn, lambda z: model.log_prior(z) + model.log_likelihood(x, z) - log_init_fn(z))


def _evaluate(path: AnnealingPath, z: torch.Tensor, beta: float, chunk_size: int) -> tuple[HMCState, torch.Tensor]:
    """f_beta's state at z (C, B, Z) and delta(z) (C, B): one forward and one backward pass,
    ``chunk_size`` chains at a time."""
    log_densities, grads, deltas = [], [], []
    for chunk in z.split(chunk_size):
        leaf = chunk.detach().requires_grad_(True)  # (c, B, Z) a fresh leaf
        with torch.enable_grad():
            delta = path.delta_fn(leaf)  # (c, B)
            log_density = path.base_fn(leaf) + beta * delta  # (c, B)
            (grad,) = torch.autograd.grad(log_density.sum(), leaf)
        log_densities.append(log_density.detach()), grads.append(grad), deltas.append(delta.detach())
    return HMCState(z, torch.cat(log_densities), torch.cat(grads)), torch.cat(deltas)


def chains_per_chunk(num_datapoints: int, chunk_size: int | None = None) -> int:
    """Chains evaluated together: ``chunk_size``, or about 4096 (chain, datapoint) rows. With the
    paper's decoder (50-200-200-784) one gradient evaluation of 16 chains x 1000 datapoints ran at
    43 GFLOP/s in one piece and at 60 in chunks of 4 chains (one thread of a shared 2-core machine
    whose 4096^2 matmul ran at 91 GFLOP/s; ``gapbench bench ais``).
    """
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of chains, got {chunk_size}")
        return chunk_size
    return max(1, DEFAULT_ROWS_PER_CHUNK // max(1, num_datapoints))


def ais_init(z: torch.Tensor, step_size: float) -> AISState:
    """Chains at z (C, B, Z) with zero log-weights and every step size ``step_size``."""
    chains = z.shape[:2]  # (C, B)
    return AISState(z, torch.zeros(chains, dtype=torch.float64, device=z.device),
                    torch.full(chains, math.log(step_size), dtype=z.dtype, device=z.device))


def ais_step(state: AISState, path: AnnealingPath, beta_from: torch.Tensor, beta_to: torch.Tensor, *,
             is_transition: bool, num_leapfrog: int, generator: RandomStream | None,
             chunk_size: int) -> tuple[AISState, HMCInfo | None]:
    """One annealing step from beta_from = beta_{t-1} to beta_to = beta_t, for every chain.

    log w += (beta_t - beta_{t-1}) delta(z), then (when ``is_transition``: every step but the last)
    one HMC transition with the chains' step sizes that leaves f_{beta_t} invariant. The step sizes
    are not changed here (:func:`adapt_step_size`).

    Returns
    -------
    the new state, and the transition's :class:`~gapbench.estimators.HMCInfo` (None without one)
    """
    beta = float(beta_to)
    hmc_state, delta = _evaluate(path, state.z, beta, chunk_size)  # f_{beta_t} at z_{t-1}
    log_weights = state.log_weights + (beta_to - beta_from) * delta.to(torch.float64)  # (C, B)
    if not is_transition:
        return state._replace(log_weights=log_weights), None
    hmc_state, info = hmc_step(hmc_state, path.logdensity_fn(beta), step_size=state.log_step_size.exp(),
                               num_leapfrog=num_leapfrog, generator=generator, chunk_size=chunk_size)
    return AISState(hmc_state.z, log_weights, state.log_step_size), info


def adapt_step_size(log_step_size: torch.Tensor, acceptance_rate: torch.Tensor,
                    procedure: AISProcedure) -> torch.Tensor:
    """log eps (C, B) moved toward the target acceptance after a transition with ``acceptance_rate`` (C, B):
    log eps + adaptation_rate * (acceptance - target), clamped to [log min_step_size, log max_step_size],
    with the acceptance averaged over the datapoint's chains (``adaptation="datapoint"``) or each
    chain's own (``"chain"``)."""
    if procedure.adaptation == "datapoint":
        acceptance_rate = acceptance_rate.mean(0, keepdim=True)  # (1, B): shared by the datapoint's chains
    return torch.clamp(log_step_size + procedure.adaptation_rate * (acceptance_rate - procedure.target_acceptance),
                       math.log(procedure.min_step_size), math.log(procedure.max_step_size))


def anneal(model, x: torch.Tensor, z: torch.Tensor, *, betas: torch.Tensor,
           log_init_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
           procedure: AISProcedure = DEFAULT_AIS, chunk_size: int | None = None, generator: RandomStream | None,
           callback: Callable[[int], None] | None = None) -> tuple[AISState, AISInfo]:
    """Move chains z (C, B, Z) along ``betas``: the driver behind :func:`ais` and :func:`reverse_ais`.

    For t = 1..T: :func:`ais_step` from beta_{t-1} to beta_t, then (after a transition)
    :func:`adapt_step_size`. delta(z) = log p(x, z) - log q(z) (q = ``log_init_fn``, or the prior
    when None). ``betas`` (T + 1,) from 0 to 1 is forward AIS (start z ~ q); from 1 to 0 it is
    reverse AIS (start z ~ p(z|x)). ``procedure``: its HMC and adaptation settings (its chains,
    steps and schedule are those of z and ``betas``); ``callback(t)`` runs after step t.

    Returns
    -------
    the final :class:`AISState` (log-weights (C, B) float64, positions (C, B, Z)) and its :class:`AISInfo`
    """
    if z.ndim != 3 or z.shape[1] != x.shape[0]:
        raise ValueError(f"chains must have shape (C, B, Z) with B = {x.shape[0]} datapoints, got {tuple(z.shape)}")
    check_procedure(procedure)
    path = annealing_path(model, x, log_init_fn)
    chunk = chains_per_chunk(x.shape[0], chunk_size)
    betas = betas.to(torch.float64)
    num_annealing_steps = betas.shape[0] - 1
    state = ais_init(z, procedure.step_size)
    sum_acceptance = torch.zeros(z.shape[:2], dtype=torch.float64, device=z.device)  # (C, B)
    num_divergent = torch.zeros(z.shape[:2], dtype=torch.float64, device=z.device)  # (C, B)
    for t in range(1, num_annealing_steps + 1):
        state, info = ais_step(state, path, betas[t - 1], betas[t], is_transition=t < num_annealing_steps,
                               num_leapfrog=procedure.num_leapfrog, generator=generator, chunk_size=chunk)
        if info is not None:
            state = state._replace(log_step_size=adapt_step_size(state.log_step_size, info.acceptance_rate, procedure))
            sum_acceptance += info.acceptance_rate.to(torch.float64)
            num_divergent += info.is_divergent.to(torch.float64)
        if callback is not None:
            callback(t)
    num_transitions = max(num_annealing_steps - 1, 1)
    return state, AISInfo(sum_acceptance / num_transitions, state.log_step_size.exp(), num_divergent / num_transitions)


def _estimate(state: AISState, info: AISInfo, *, reverse: bool) -> AISEstimate:
    """log mean exp over chains (negated for reverse AIS) with the IWAE delta-method error."""
    estimate = iwae_from_stats(empty_stats().merge(state.log_weights))  # (B,) each
    value = -estimate.value if reverse else estimate.value
    return AISEstimate(value=value, stderr=estimate.stderr, ess=estimate.ess,
                       acceptance_rate=info.acceptance_rate.mean(0),
                       step_size=info.step_size.to(torch.float64).mean(0),
                       divergence_rate=info.divergence_rate.mean(0), log_weights=state.log_weights, z=state.z)


def _initial(init: Posterior | Distribution | None, model, x: torch.Tensor, num_chains: int,
             latent_size: int | None, generator: RandomStream | None):
    """Initial chains (C, B, Z) and log q (None for the prior)."""
    if init is None:
        latent_size = latent_size or getattr(model, "latent_size", None)
        if latent_size is None:
            raise ValueError("AIS from the prior needs latent_size= (the model has no latent_size attribute)")
        sample_prior = getattr(model, "sample_prior", None)
        if callable(sample_prior):  # a prior that is not N(0, I), e.g. p(z2) p(z1|z2) of a two-layer model
            z = sample_prior((num_chains, x.shape[0]), generator=generator, dtype=x.dtype, device=x.device)
            return z.detach(), None  # (C, B, Z) ~ p(z)
        z = random_normal((num_chains, x.shape[0], latent_size), generator=generator, dtype=x.dtype,
                          device=x.device, batch_dim=1)  # (C, B, Z) ~ N(0, I)
        return z, None
    posterior = as_posterior(init)
    log_init_fn = _log_prob_fn(posterior)
    with torch.no_grad():
        z, _ = posterior.rsample_and_log_prob(num_chains, generator=generator)  # (C, B, Z)
    if z.shape[1] != x.shape[0]:
        raise ValueError(f"the initial distribution holds {z.shape[1]} datapoints but x holds {x.shape[0]}")
    return z.detach(), log_init_fn


def ais(model, x: torch.Tensor, *, init: Posterior | Distribution | None = None,
        procedure: AISProcedure = DEFAULT_AIS, latent_size: int | None = None, chunk_size: int | None = None,
        generator: RandomStream | None, callback: Callable[[int], None] | None = None) -> AISEstimate:
    """Forward AIS: a stochastic lower bound on log p(x) per datapoint.

    AIS = log (1/C) sum_c w_c with log w_c = sum_t (beta_t - beta_{t-1}) (log p(x, z_c,t-1) - log q(z_c,t-1)).

    Parameters
    ----------
    model : has ``log_prior(z)`` and ``log_likelihood(x, z)``, both (C, B) for z (C, B, Z)
    x : (B, D)
    init : q(z), a Posterior or torch Distribution with batch shape (B,) and event shape (Z,)
        (e.g. the encoder's output) with a log density; None starts from the prior: draws of
        ``model.sample_prior(shape, generator=...)`` where the model has it, else N(0, I)
    procedure : the settings (:class:`AISProcedure`): C = ``num_chains`` chains per datapoint,
        T = ``num_steps`` annealing steps (T - 1 intermediate distributions, one HMC transition each)
        spaced by ``schedule`` (see :func:`annealing_schedule`), ``num_leapfrog`` leapfrog steps per
        transition, and the step-size adaptation (see :func:`adapt_step_size` and the module notes)
    latent_size : Z, only needed from the prior when the model has no ``latent_size`` attribute
    chunk_size : chains whose gradients are evaluated together (None: about 4096 rows of chains x
        datapoints); the result does not depend on it
    generator : random stream (keyword-only)
    callback : called with t after annealing step t (progress bars)

    Returns
    -------
    :class:`AISEstimate`; value, stderr and ess are (B,) float64.
    """
    check_procedure(procedure)
    betas = annealing_schedule(procedure.num_steps, procedure.schedule)
    z, log_init_fn = _initial(init, model, x, procedure.num_chains, latent_size, generator)
    state, info = anneal(model, x, z, betas=betas, log_init_fn=log_init_fn, procedure=procedure,
                         chunk_size=chunk_size, generator=generator, callback=callback)
    return _estimate(state, info, reverse=False)


def reverse_ais(model, x: torch.Tensor, z: torch.Tensor, *, init: Posterior | Distribution | None = None,
                procedure: AISProcedure = DEFAULT_AIS, chunk_size: int | None = None,
                generator: RandomStream | None, callback: Callable[[int], None] | None = None) -> AISEstimate:
    """Reverse AIS from exact posterior samples: a stochastic upper bound on log p(x).

    The chains start at z ~ p(z|x) (for simulated data, the z that generated x) and anneal from
    beta = 1 to 0 toward q; each weight w_c then estimates 1 / p(x) without bias, and
    -log (1/C) sum_c w_c >= log p(x) in expectation (Grosse, Ghahramani & Adams, 2015).

    Parameters
    ----------
    z : (B, Z) one exact posterior sample per datapoint, copied to every chain, or (C, B, Z)
    the rest : as :func:`ais`

    Returns
    -------
    :class:`AISEstimate` whose value is the upper bound.
    """
    check_procedure(procedure)
    num_chains = procedure.num_chains
    if z.ndim == 2:
        z = z.expand(num_chains, *z.shape)  # (C, B, Z): every chain starts at the datapoint's sample
    if z.shape[0] != num_chains:
        raise ValueError(f"z holds {z.shape[0]} chains, num_chains is {num_chains}")
    log_init_fn = None if init is None else _log_prob_fn(as_posterior(init))
    betas = annealing_schedule(procedure.num_steps, procedure.schedule).flip(0)  # (T + 1,) from 1 to 0
    state, info = anneal(model, x, z.detach().clone(), betas=betas, log_init_fn=log_init_fn, procedure=procedure,
                         chunk_size=chunk_size, generator=generator, callback=callback)
    return _estimate(state, info, reverse=True)
