"""Hamiltonian Monte Carlo: one pure transition, batched over independent chains.

A position z of shape (..., Z) is extended with a momentum p ~ N(0, M) and moved along the
Hamiltonian flow of H(z, p) = -log pi(z) + p^T M^{-1} p / 2 by ``num_leapfrog`` leapfrog steps of
size epsilon; the end point is accepted with probability min(1, exp(H(z, p) - H(z', p')))
(Duane et al., 1987; Neal, 2011, "MCMC using Hamiltonian dynamics", section 5.2). The leading
dimensions (...) are independent chains: every chain has its own step size, its own accept/reject
decision and its own diagnostics, so AIS runs all datapoints x chains in one batch.

The shape follows BlackJAX (mcmc/hmc.py): ``hmc_init`` builds an :class:`HMCState` (position, log
density, gradient), and ``hmc_step(state, logdensity_fn, ...) -> (state, info)`` is a pure
transition; the loop that drives it lives elsewhere (``gapbench.estimators.ais``). No autograd graph
outlives a call: gradients are taken with ``torch.autograd.grad`` on a fresh leaf and detached.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from gapbench.posteriors import RandomStream, random_normal, random_uniform

LogDensityFn = Callable[[torch.Tensor], torch.Tensor]

DIVERGENCE_THRESHOLD = 1000.0  # an energy error above this (nats) marks a divergent trajectory (BlackJAX's default)


class HMCState(NamedTuple):
    """A batch of chain positions with their log density and its gradient.

    Attributes
    ----------
    z : (..., Z) positions
    log_density : (...) log pi(z), up to a constant
    grad : (..., Z) gradient of log pi at z
    """

    z: torch.Tensor
    log_density: torch.Tensor
    grad: torch.Tensor


class HMCInfo(NamedTuple):
    """Diagnostics of one transition, per chain, each of shape (...).

    Attributes
    ----------
    acceptance_rate : min(1, exp(-energy_change)), the Metropolis acceptance probability
    is_accepted : whether the proposal was taken
    is_divergent : whether the energy error exceeded the divergence threshold (or was not finite)
    energy_change : H(z', p') - H(z, p), the leapfrog integrator's energy error
    """

    acceptance_rate: torch.Tensor
    is_accepted: torch.Tensor
    is_divergent: torch.Tensor
    energy_change: torch.Tensor


def value_and_grad(logdensity_fn: LogDensityFn, z: torch.Tensor, *,
                   chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(z) (...) and its gradient (..., Z), both detached (no graph survives the call).

    Each chain's log density depends on its own z only, so the gradient of the sum over chains is
    every chain's own gradient. ``chunk_size`` evaluates ``chunk_size`` slices of z along its first
    dimension at a time (``logdensity_fn`` must accept any number of them): the activations of a
    chunk stay in cache and the peak memory falls; the values do not depend on it.
    """
    if chunk_size is None or chunk_size >= z.shape[0]:
        return _value_and_grad(logdensity_fn, z)
    parts = [_value_and_grad(logdensity_fn, chunk) for chunk in z.split(chunk_size)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _value_and_grad(logdensity_fn: LogDensityFn, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = z.detach().requires_grad_(True)  # (..., Z) a fresh leaf
    with torch.enable_grad():
        log_density = logdensity_fn(leaf)  # (...)
        (grad,) = torch.autograd.grad(log_density.sum(), leaf)
    return log_density.detach(), grad


def hmc_init(z: torch.Tensor, logdensity_fn: LogDensityFn) -> HMCState:
    """The state at positions z (..., Z): one evaluation of the log density and its gradient."""
    log_density, grad = value_and_grad(logdensity_fn, z)
    return HMCState(z.detach(), log_density, grad)


def leapfrog(state: HMCState, momentum: torch.Tensor, logdensity_fn: LogDensityFn, *,
             step_size: torch.Tensor | float, num_leapfrog: int, inverse_mass: torch.Tensor | None = None,
             chunk_size: int | None = None) -> tuple[HMCState, torch.Tensor]:
    """``num_leapfrog`` leapfrog (velocity Verlet) steps of Hamilton's equations.

    For dz/dt = M^{-1} p, dp/dt = grad log pi(z), each step is
        p <- p + (eps/2) grad log pi(z);  z <- z + eps M^{-1} p;  p <- p + (eps/2) grad log pi(z)
    and consecutive half steps of p are merged, so ``num_leapfrog`` steps cost ``num_leapfrog`` gradient
    evaluations (the gradient at the start comes with ``state``). The map is volume-preserving and
    time-reversible, with an energy error of order eps^2 (Neal, 2011, section 2.3).

    Parameters
    ----------
    state : positions (..., Z) with their log density and gradient
    momentum : (..., Z)
    logdensity_fn : z (..., Z) -> log pi(z) (...)
    step_size : eps, a float or a tensor broadcastable to (...) (one step size per chain)
    num_leapfrog : L >= 1
    inverse_mass : M^{-1}, diagonal, broadcastable to (..., Z); None is the identity
    chunk_size : evaluate the gradient in chunks along the first dimension (see :func:`value_and_grad`)

    Returns
    -------
    the state at the end point and the momentum there (..., Z)
    """
    if num_leapfrog < 1:
        raise ValueError(f"num_leapfrog must be at least 1, got {num_leapfrog}")
    eps = torch.as_tensor(step_size, dtype=state.z.dtype, device=state.z.device)
    eps = eps[..., None] if eps.ndim else eps  # (..., 1): one step size per chain
    z, grad = state.z, state.grad
    p = momentum + 0.5 * eps * grad  # (..., Z) first half step
    for i in range(num_leapfrog):
        velocity = p if inverse_mass is None else inverse_mass * p  # (..., Z)
        z = z + eps * velocity  # (..., Z)
        log_density, grad = value_and_grad(logdensity_fn, z, chunk_size=chunk_size)
        p = p + (eps if i < num_leapfrog - 1 else 0.5 * eps) * grad  # (..., Z); the last is a half step
    return HMCState(z, log_density, grad), p


def kinetic_energy(momentum: torch.Tensor, inverse_mass: torch.Tensor | None = None) -> torch.Tensor:
    """p^T M^{-1} p / 2 per chain: (..., Z) -> (...)."""
    weighted = momentum.square() if inverse_mass is None else inverse_mass * momentum.square()
    return 0.5 * weighted.sum(-1)


def _where(mask: torch.Tensor, new: HMCState, old: HMCState) -> HMCState:
    """Per chain: the new state where ``mask`` (...) holds, the old one elsewhere."""
    column = mask[..., None]  # (..., 1)
    return HMCState(torch.where(column, new.z, old.z), torch.where(mask, new.log_density, old.log_density),
                    torch.where(column, new.grad, old.grad))


def hmc_step(state: HMCState, logdensity_fn: LogDensityFn, *, step_size: torch.Tensor | float,
             num_leapfrog: int, generator: RandomStream | None,
             inverse_mass: torch.Tensor | None = None, divergence_threshold: float = DIVERGENCE_THRESHOLD,
             chunk_size: int | None = None) -> tuple[HMCState, HMCInfo]:
    """One HMC transition for every chain; it leaves pi invariant (Neal, 2011, section 3.2).

    Draw p ~ N(0, M), integrate ``num_leapfrog`` leapfrog steps, accept the end point with
    probability min(1, exp(-(H(z', p') - H(z, p)))); a non-finite energy is a rejection.

    Parameters
    ----------
    state : positions (..., Z) with log density (...) and gradient (..., Z) under ``logdensity_fn``
    logdensity_fn : z (..., Z) -> log pi(z) (...); chains must not interact
    step_size : eps, float or tensor broadcastable to (...), one per chain
    num_leapfrog : L, gradient evaluations per transition
    generator : random stream for the momentum and the accept decision (keyword-only); with
        ``DatapointStreams`` the datapoints are the last dimension of ``...`` (chains (C, B))
    inverse_mass : diagonal M^{-1}, broadcastable to (..., Z); None is the identity
    divergence_threshold : energy error (nats) above which a trajectory counts as divergent
    chunk_size : evaluate the gradient in chunks along the first dimension (see :func:`value_and_grad`)

    Returns
    -------
    the new state and an :class:`HMCInfo` of per-chain diagnostics
    """
    z = state.z
    momentum = random_normal(z.shape, generator=generator, dtype=z.dtype, device=z.device,
                             batch_dim=z.ndim - 2)  # (..., Z) ~ N(0, I)
    if inverse_mass is not None:
        momentum = momentum / inverse_mass.sqrt()  # ~ N(0, M)
    proposal, end_momentum = leapfrog(state, momentum, logdensity_fn, step_size=step_size,
                                      num_leapfrog=num_leapfrog, inverse_mass=inverse_mass, chunk_size=chunk_size)
    energy = -state.log_density + kinetic_energy(momentum, inverse_mass)  # (...)
    proposal_energy = -proposal.log_density + kinetic_energy(end_momentum, inverse_mass)  # (...)
    energy_change = proposal_energy - energy  # (...)
    is_finite = torch.isfinite(energy_change)
    energy_change = torch.where(is_finite, energy_change, torch.full_like(energy_change, float("inf")))
    acceptance_rate = torch.exp(torch.clamp(-energy_change, max=0.0))  # (...) in [0, 1]
    uniform = random_uniform(acceptance_rate.shape, generator=generator, dtype=acceptance_rate.dtype,
                             device=acceptance_rate.device, batch_dim=acceptance_rate.ndim - 1)  # (...)
    is_accepted = uniform < acceptance_rate
    is_divergent = energy_change > divergence_threshold
    return _where(is_accepted, proposal, state), HMCInfo(acceptance_rate, is_accepted, is_divergent, energy_change)
