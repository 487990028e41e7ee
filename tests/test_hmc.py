"""The HMC kernel: leapfrog against the harmonic oscillator's exact solution, and invariance of a
known Gaussian checked statistically."""

import math

import pytest
import torch

from gapbench.estimators.hmc import HMCState, hmc_init, hmc_step, kinetic_energy, leapfrog, value_and_grad


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


def oscillator(z):
    """log pi(z) = -|z|^2 / 2: Hamilton's equations are z'' = -z, solved by rotations."""
    return -0.5 * z.square().sum(-1)


def test_value_and_grad_matches_analytic_and_keeps_no_graph():
    z = torch.randn(4, 3, 2, dtype=torch.float64)
    log_density, grad = value_and_grad(oscillator, z)
    torch.testing.assert_close(log_density, -0.5 * z.square().sum(-1))
    torch.testing.assert_close(grad, -z)
    assert not log_density.requires_grad and not grad.requires_grad and grad.grad_fn is None


def test_leapfrog_is_the_exact_discrete_map_of_the_oscillator():
    """For z'' = -z one leapfrog step is the linear map [[1 - e^2/2, e], [-e (1 - e^2/4), 1 - e^2/2]]."""
    eps, num_leapfrog = 0.3, 7
    z0 = torch.tensor([[0.8, -1.1]], dtype=torch.float64)
    p0 = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    state, p = leapfrog(hmc_init(z0, oscillator), p0, oscillator, step_size=eps, num_leapfrog=num_leapfrog)
    step = torch.tensor([[1 - eps**2 / 2, eps], [-eps * (1 - eps**2 / 4), 1 - eps**2 / 2]], dtype=torch.float64)
    expected = torch.linalg.matrix_power(step, num_leapfrog) @ torch.stack([z0[0], p0[0]])  # (2, Z): rows z, p
    torch.testing.assert_close(state.z[0], expected[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(p[0], expected[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(state.grad, -state.z)


def test_leapfrog_converges_to_the_continuous_solution_at_second_order():
    z0 = torch.tensor([[1.0, 0.0, -0.5]], dtype=torch.float64)
    p0 = torch.tensor([[0.0, 1.0, 0.3]], dtype=torch.float64)
    duration = 2.0
    exact_z = z0 * math.cos(duration) + p0 * math.sin(duration)
    exact_p = -z0 * math.sin(duration) + p0 * math.cos(duration)
    errors = []
    for num_leapfrog in (20, 40, 80):
        state, p = leapfrog(hmc_init(z0, oscillator), p0, oscillator, step_size=duration / num_leapfrog,
                            num_leapfrog=num_leapfrog)
        errors.append(torch.cat([state.z - exact_z, p - exact_p]).abs().max().item())
    assert errors[-1] < 1e-3
    for coarse, fine in zip(errors[:-1], errors[1:]):
        assert coarse / fine == pytest.approx(4.0, rel=0.05)  # halving eps quarters the error


def test_leapfrog_is_reversible_and_per_chain_step_sizes_are_independent():
    torch.manual_seed(0)
    z0 = torch.randn(5, 3, dtype=torch.float64)
    p0 = torch.randn(5, 3, dtype=torch.float64)
    eps = torch.tensor([0.01, 0.1, 0.2, 0.4, 0.8], dtype=torch.float64)  # (5,) one per chain
    forward, p1 = leapfrog(hmc_init(z0, oscillator), p0, oscillator, step_size=eps, num_leapfrog=6)
    back, p2 = leapfrog(forward, -p1, oscillator, step_size=eps, num_leapfrog=6)
    torch.testing.assert_close(back.z, z0, rtol=0, atol=1e-12)
    torch.testing.assert_close(-p2, p0, rtol=0, atol=1e-12)
    for i in range(5):  # each chain's path is its own, whatever the others' step sizes
        alone, _ = leapfrog(hmc_init(z0[i:i + 1], oscillator), p0[i:i + 1], oscillator,
                            step_size=float(eps[i]), num_leapfrog=6)
        torch.testing.assert_close(alone.z[0], forward.z[i], rtol=0, atol=1e-14)


def test_energy_error_shrinks_with_step_size():
    torch.manual_seed(1)
    z0, p0 = torch.randn(100, 4, dtype=torch.float64), torch.randn(100, 4, dtype=torch.float64)
    state0 = hmc_init(z0, oscillator)
    h0 = -state0.log_density + kinetic_energy(p0)
    drift = []
    for eps in (0.2, 0.1):
        state, p = leapfrog(state0, p0, oscillator, step_size=eps, num_leapfrog=int(2 / eps))
        drift.append((-state.log_density + kinetic_energy(p) - h0).abs().max().item())
    assert drift[1] < drift[0] / 3


def correlated_gaussian():
    mean = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    scale_tril = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.5, 0.0], [-0.3, 0.2, 0.2]], dtype=torch.float64)
    return torch.distributions.MultivariateNormal(mean, scale_tril=scale_tril)


def moment_z_scores(z: torch.Tensor, target) -> torch.Tensor:
    """z-scores of the sample mean and of the sample second central moments of N independent draws
    (..., N, Z) against the target's, from their standard errors under the target."""
    n = z.shape[-2]
    mean, cov = target.mean, target.covariance_matrix
    mean_z = (z.mean(-2) - mean) / torch.sqrt(torch.diagonal(cov) / n)  # (..., Z)
    centred = z - mean  # (..., N, Z)
    second = torch.einsum("...ni,...nj->...ij", centred, centred) / n  # (..., Z, Z)
    # Var of one product (z_i - m_i)(z_j - m_j) under a Gaussian: S_ii S_jj + S_ij^2
    var = torch.outer(torch.diagonal(cov), torch.diagonal(cov)) + cov.square()
    second_z = (second - cov) / torch.sqrt(var / n)  # (..., Z, Z)
    return torch.cat([mean_z.flatten(), second_z.flatten()])


def test_hmc_leaves_a_correlated_gaussian_invariant():
    """Start N chains at exact draws; after several transitions (mixed step sizes, many rejections)
    the draws must still have the target's mean and covariance, to within their standard errors."""
    target = correlated_gaussian()
    g = torch.Generator().manual_seed(0)
    num_chains = 20000
    with torch.random.fork_rng():
        torch.manual_seed(2)
        z = target.sample((num_chains,))  # (N, Z)
    state = hmc_init(z, target.log_prob)
    step_size = torch.rand(num_chains, generator=g, dtype=torch.float64) * 0.6 + 0.05  # (N,) per chain
    accepted = 0.0
    for _ in range(5):
        state, info = hmc_step(state, target.log_prob, step_size=step_size, num_leapfrog=5, generator=g)
        accepted += info.is_accepted.double().mean().item() / 5
    assert 0.2 < accepted < 0.95  # the accept/reject step is exercised
    scores = moment_z_scores(state.z, target)
    assert scores.abs().max() < 4.5, scores  # 12 statistics: P(any |z| > 4.5) ~ 1e-4 under the null


def test_the_invariance_check_catches_a_kernel_without_metropolis_correction():
    """Power check for the test above: always accepting the leapfrog proposal biases the draws."""
    target = correlated_gaussian()
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(2)
        z = target.sample((20000,))
    state = hmc_init(z, target.log_prob)
    for _ in range(5):
        momentum = torch.randn(z.shape, generator=g, dtype=z.dtype)
        state, _ = leapfrog(state, momentum, target.log_prob, step_size=0.3, num_leapfrog=5)
    assert moment_z_scores(state.z, target).abs().max() > 10


def test_hmc_step_info_and_divergences():
    g = torch.Generator().manual_seed(0)
    z = torch.zeros(4, 2, dtype=torch.float64)
    state = hmc_init(z, oscillator)
    new, info = hmc_step(state, oscillator, step_size=torch.tensor([1e-3, 1e-3, 50.0, 50.0], dtype=torch.float64),
                         num_leapfrog=3, generator=g)
    assert isinstance(new, HMCState) and info.acceptance_rate.shape == (4,)
    assert torch.all(info.acceptance_rate[:2] > 0.99) and torch.all(info.is_accepted[:2])
    assert torch.all(info.is_divergent[2:]) and not torch.any(info.is_accepted[2:])  # huge steps blow up
    torch.testing.assert_close(new.z[2:], z[2:])  # rejected chains stay put
    torch.testing.assert_close(new.log_density, oscillator(new.z))


def test_non_finite_proposals_are_rejected():
    def walled(z):  # log density -inf outside the unit ball
        inside = z.square().sum(-1) < 1.0
        return torch.where(inside, -0.5 * z.square().sum(-1), torch.full_like(z[..., 0], -math.inf))
    g = torch.Generator().manual_seed(0)
    state = hmc_init(torch.zeros(3, 2, dtype=torch.float64), walled)
    new, info = hmc_step(state, walled, step_size=5.0, num_leapfrog=2, generator=g)
    assert not torch.any(info.is_accepted) and torch.all(info.acceptance_rate == 0)
    torch.testing.assert_close(new.z, state.z)
