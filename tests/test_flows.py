"""Flow posteriors: log-determinants against autograd Jacobians, inverses, the identity, each density on
its own (normalised, sampled from, chunk-consistent), the amortized and local forms, and how much of
the FFG approximation gap local flows close on a linear-Gaussian model."""

import math

import pytest
import torch
from torch.autograd.functional import jacobian
from torch.distributions import Independent, Normal

from gapbench.estimators import elbo
from gapbench.measure import local_posterior
from gapbench.posteriors import (AuxiliaryCouplingFlow, DiagonalGaussian, FlowPosterior, make_encoder, make_family,
                                 made_masks)

from conftest import make_linear_gaussian

FLOWS = ("flow", "planar", "iaf")
DTYPE = torch.float64


def random_flow(name: str, *, num_datapoints: int = 3, latent_size: int = 3, seed: int = 0,
                spread: float = 0.5) -> FlowPosterior:
    """A local flow of family ``name`` moved well away from the identity (float64)."""
    g = torch.Generator().manual_seed(seed)
    family = make_family(name, num_steps=3 if name != "planar" else 4, hidden_size=6)
    like = torch.zeros(1, dtype=DTYPE)
    params = family.init_params(num_datapoints, latent_size, like=like, generator=g)
    params = {k: v + spread * torch.randn(v.shape, generator=g, dtype=DTYPE) for k, v in params.items()}
    return family.posterior(params)


def per_datapoint_log_det(fn, inputs: torch.Tensor) -> torch.Tensor:
    """log |det| of the Jacobian of ``fn`` (1, B, n) -> (1, B, n), one n x n block per datapoint: (B,)."""
    _, num_datapoints, n = inputs.shape
    full = jacobian(lambda flat: fn(flat.view(1, num_datapoints, n)).reshape(-1), inputs.reshape(-1))
    blocks = full.view(num_datapoints, n, num_datapoints, n)
    return torch.stack([torch.linalg.slogdet(blocks[b, :, b, :])[1] for b in range(num_datapoints)])


# --- the maps themselves --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["planar", "iaf"])
def test_log_det_matches_autograd_jacobian(name):
    q = random_flow(name)
    eps = torch.randn(1, 3, 3, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    _, log_det = q.flow(eps)
    expected = per_datapoint_log_det(lambda e: q.flow(e)[0], eps)
    torch.testing.assert_close(log_det[0], expected, rtol=0, atol=1e-10)
    # the whole map eps -> z adds the base's scale: log q(z) = log N(eps) - log |dz/deps|
    z, log_q = q.rsample_and_log_prob(1, generator=torch.Generator().manual_seed(2))
    eps0 = q.base_noise(1, generator=torch.Generator().manual_seed(2))  # the same draw
    full = per_datapoint_log_det(lambda e: q.to_latent(q.flow(e)[0]), eps0)
    torch.testing.assert_close(log_q[0], Normal(0.0, 1.0).log_prob(eps0).sum(-1)[0] - full, rtol=0, atol=1e-10)


def test_coupling_log_det_matches_autograd_jacobian():
    q = random_flow("flow")
    g = torch.Generator().manual_seed(1)
    eps, v = torch.randn(2, 1, 3, 3, generator=g, dtype=DTYPE)

    def couple(joint):  # (1, B, 2Z) -> (1, B, 2Z)
        e_t, v_t, _ = q.couple(joint[..., :3], joint[..., 3:])
        return torch.cat([e_t, v_t], -1)

    _, _, log_det = q.couple(eps, v)
    expected = per_datapoint_log_det(couple, torch.cat([eps, v], -1))
    torch.testing.assert_close(log_det[0], expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", FLOWS)
def test_flows_invert(name):
    q = random_flow(name, spread=1.0)
    g = torch.Generator().manual_seed(3)
    eps = 2 * torch.randn(4, 3, 3, generator=g, dtype=DTYPE)
    if name == "flow":
        v = torch.randn(4, 3, 3, generator=g, dtype=DTYPE)
        e_t, v_t, log_det = q.couple(eps, v)
        e_0, v_0, log_det_back = q.uncouple(e_t, v_t)
        torch.testing.assert_close(v_0, v, rtol=0, atol=1e-10)
        torch.testing.assert_close(log_det_back, log_det, rtol=0, atol=1e-10)
    else:
        e_t, _ = q.flow(eps)
        e_0 = q.inverse(e_t)
    torch.testing.assert_close(e_0, eps, rtol=0, atol=1e-9)


def test_planar_layers_stay_invertible():
    """u_hat keeps w . u_hat >= -1 whatever u (Rezende & Mohamed, 2015, appendix A.1), and u = 0 is
    exactly the identity."""
    from gapbench.posteriors.planar import constrained_u

    g = torch.Generator().manual_seed(4)
    u, w = 5 * torch.randn(2, 1000, 4, generator=g, dtype=DTYPE)
    assert ((w * constrained_u(u, w)).sum(-1) >= -1 - 1e-12).all()
    assert torch.equal(constrained_u(torch.zeros_like(w), w).abs().max() < 1e-15, torch.tensor(True))


def test_made_masks_are_autoregressive():
    for reverse in (False, True):
        into_hidden, into_output = made_masks(5, 12, reverse=reverse)
        connected = (into_output @ into_hidden) > 0  # (2Z, Z): output j depends on input i
        degrees = torch.arange(1, 6).flip(0) if reverse else torch.arange(1, 6)
        allowed = degrees[:, None] > degrees[None, :]  # strictly earlier variables only
        assert not (connected & ~allowed.repeat(2, 1)).any()
        assert connected[: 5].sum() > 0  # and not empty


# --- the identity and the densities -------------------------------------------------------------------

@pytest.mark.parametrize("name", FLOWS)
def test_flow_at_identity_is_exactly_the_ffg(name):
    g = torch.Generator().manual_seed(5)
    base = DiagonalGaussian(torch.randn(4, 3, generator=g, dtype=DTYPE), torch.randn(4, 3, generator=g, dtype=DTYPE))
    family = make_family(name, hidden_size=7)
    q = family.posterior(family.init_params(4, 3, like=base.mean, init_from=base, generator=g))
    z, log_q = q.rsample_and_log_prob(50, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(log_q, base.log_prob(z), rtol=0, atol=1e-12)
    if name != "flow":  # the same noise gives the same samples (the auxiliary flow also draws v)
        z_ffg, _ = base.rsample_and_log_prob(50, generator=torch.Generator().manual_seed(6))
        torch.testing.assert_close(z, z_ffg, rtol=0, atol=1e-12)
    prior = family.posterior(family.init_params(4, 3, like=base.mean, generator=g))
    z, log_q = prior.rsample_and_log_prob(10, generator=g)
    torch.testing.assert_close(log_q, Normal(0.0, 1.0).log_prob(z).sum(-1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", FLOWS)
def test_fresh_flow_encoder_is_its_ffg(name):
    torch.manual_seed(0)
    encoder = make_encoder(name, 7, 3, (5,), num_steps=2, flow_hidden=4).double()
    x = torch.rand(4, 7, dtype=DTYPE)
    q = encoder(x)
    base = DiagonalGaussian(q.params["mean"], q.params["log_var"])
    z, log_q = q.rsample_and_log_prob(20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(log_q, base.log_prob(z), rtol=0, atol=1e-12)


def grid(latent_size: int = 2, half_width: float = 9.0, num: int = 361) -> tuple[torch.Tensor, float]:
    axis = torch.linspace(-half_width, half_width, num, dtype=DTYPE)
    points = torch.cartesian_prod(*[axis] * latent_size)  # (num^2, 2)
    return points, (axis[1] - axis[0]).item() ** latent_size


@pytest.mark.parametrize("name", ["planar", "iaf"])
def test_density_is_normalised_and_sampled_from(name):
    """On its own: exp(log q) integrates to 1 on a grid, and the sampler's mean is the density's mean."""
    seed = {"planar": 9, "iaf": 8}[name]  # planar: no layer close to w.u_hat = -1 (a spike the grid misses)
    q = random_flow(name, num_datapoints=1, latent_size=2, spread=0.7, seed=seed)
    q.params["log_var"] = q.params["log_var"].clamp(-1.0, 0.5)  # keep the mass inside the grid
    points, cell = grid()
    log_q = q.log_prob(points[:, None, :])[:, 0]  # (P,)
    mass = (log_q.exp() * cell).sum()
    assert abs(mass.item() - 1.0) < 2e-3, mass
    mean_density = (points * log_q.exp()[:, None] * cell).sum(0) / mass
    z, log_q_samples = q.rsample_and_log_prob(20000, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(log_q_samples, q.log_prob(z), rtol=0, atol=1e-8)
    sample_mean, sample_std = z[:, 0].mean(0), z[:, 0].std(0)
    assert torch.all((sample_mean - mean_density).abs() < 4 * sample_std / math.sqrt(20000) + 2e-3)


def test_auxiliary_flow_densities_on_their_own():
    """q(z_T, v_T) integrates to 1 (Z = 1: a 2-D grid); r(v_T|.) is the Gaussian torch.distributions
    gives; log q~ = log q(z, v) - log r(v|z) has E[log q~ | z] = log q(z) + KL(q(v|z) || r(v|z)) >= log q(z),
    so the ELBO with q~ is below the ELBO with the marginal q(z): still a lower bound on log p(x)."""
    q = random_flow("flow", num_datapoints=1, latent_size=1, spread=0.4, seed=11)  # mass inside the grid
    q.params["log_var"] = q.params["log_var"].clamp(-1.0, 0.5)
    points, cell = grid()
    log_joint, _ = q.joint_log_prob(points[:, None, :1], points[:, None, 1:])  # (P, 1)
    mass = (log_joint.exp() * cell).sum()
    assert abs(mass.item() - 1.0) < 2e-3, mass
    z, v, log_q_joint, log_r = q.sample_joint(4000, generator=torch.Generator().manual_seed(11))
    again, log_r_again = q.joint_log_prob(z, v)
    torch.testing.assert_close(log_q_joint, again, rtol=0, atol=1e-9)
    eps = (z - q.params["mean"]) * torch.exp(-0.5 * q.params["log_var"])
    r_mean, r_log_var = q._net("r", eps)
    r = Independent(Normal(r_mean, torch.exp(0.5 * r_log_var)), 1)
    torch.testing.assert_close(log_r, r.log_prob(v), rtol=0, atol=1e-10)
    torch.testing.assert_close(log_r_again, log_r, rtol=0, atol=1e-9)
    # the marginal q(z) by integrating v on the grid; log q~ is above it on average (a valid ELBO)
    axis = points[::361, 0]  # (V,)
    num_v, num_z = axis.numel(), z.shape[0]
    log_q_zv, _ = q.joint_log_prob(z[:, 0, 0].expand(num_v, -1).reshape(-1, 1, 1),
                                   axis[:, None].expand(-1, num_z).reshape(-1, 1, 1), with_r=False)
    log_marginal = torch.logsumexp(log_q_zv.view(num_v, num_z), 0) + math.log(axis[1] - axis[0])  # (K,)
    kl = (log_q_joint - log_r)[:, 0] - log_marginal  # E[kl] = E KL(q(v|z) || r(v|z)) >= 0
    assert kl.mean() > -4 * kl.std() / math.sqrt(kl.numel())


@pytest.mark.parametrize("name", FLOWS)
def test_chunked_sampling_matches_one_draw(name):
    q = random_flow(name)
    z, log_q = q.rsample_and_log_prob(10, generator=torch.Generator().manual_seed(12))
    g = torch.Generator().manual_seed(12)
    parts = [q.rsample_and_log_prob(k, generator=g) for k in (3, 7)]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), z, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), log_q, rtol=0, atol=0)


# --- amortized and local forms --------------------------------------------------------------------------

@pytest.mark.parametrize("name", FLOWS)
def test_encoder_output_becomes_local_parameters(name):
    torch.manual_seed(1)
    encoder = make_encoder(name, 6, 3, (8,), num_steps=2, flow_hidden=5).double()
    for p in encoder.parameters():  # away from the identity
        p.data.add_(0.3 * torch.randn_like(p))
    x = torch.rand(5, 6, dtype=DTYPE)
    q = encoder(x)
    z, log_q = q.rsample_and_log_prob(8, generator=torch.Generator().manual_seed(0))
    # gradients reach every encoder parameter
    grads = torch.autograd.grad(log_q.sum() + z.sum(), list(encoder.parameters()), allow_unused=True)
    assert all(g is not None for g in grads)
    family = make_family(name)  # sizes come from the encoder's output
    params = family.init_params(5, 3, like=x, init_from=q)
    assert all(v.shape[0] == 5 for v in params.values())
    z_local, log_q_local = family.posterior(params).rsample_and_log_prob(8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z_local, z.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(log_q_local, log_q.detach(), rtol=0, atol=1e-12)


def test_auxiliary_flow_stl_surrogate():
    """The surrogate has the value of log q~ and the same gradient for r's parameters (r belongs to
    the target), but drops the score of q(z, v) for the others."""
    q = random_flow("flow")
    params = {k: v.clone().requires_grad_(True) for k, v in q.params.items()}
    live = AuxiliaryCouplingFlow(params)
    frozen = AuxiliaryCouplingFlow({k: v.detach() for k, v in params.items()})
    z, log_q, log_q_path = live.rsample_and_log_prob_stl(6, frozen=frozen, generator=torch.Generator().manual_seed(0))
    _, log_q_plain = live.rsample_and_log_prob(6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(log_q_path, log_q, rtol=0, atol=1e-10)
    torch.testing.assert_close(log_q, log_q_plain, rtol=0, atol=1e-10)
    names = list(params)
    def grads(value):
        out = torch.autograd.grad(value.sum(), list(params.values()), retain_graph=True, allow_unused=True)
        return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, out)}

    g_path, g_plain = grads(log_q_path), grads(log_q)
    for part in ("w1", "b1", "w2", "b2"):
        torch.testing.assert_close(g_path[f"r.{part}"], g_plain[f"r.{part}"], rtol=0, atol=1e-10)
    assert not torch.allclose(g_path["log_var"], g_plain["log_var"])


# --- what local flows achieve -------------------------------------------------------------------------

# Measured with this test's settings (20 datapoints, width 32, init from the prior, 20,000 samples):
# fraction of the FFG approximation gap (0.152 nats per datapoint) closed: flow 0.85, iaf 0.96,
# planar 0.94 (Monte Carlo standard error 0.002 each).
CLOSED_AT_LEAST = {"flow": 0.75, "iaf": 0.85, "planar": 0.85}


@pytest.mark.slow
@pytest.mark.parametrize("name", FLOWS)
def test_local_flows_close_most_of_the_ffg_approximation_gap(name):
    """Linear-Gaussian model with a correlated posterior: the FFG's approximation gap is known exactly,
    log p(x) - L[q*_FFG]; a flow refined per datapoint (batched) must close most of it.

    Slow (the slowest test of the suite: 338 s for the three families on a loaded 2-core machine):
    refinement from the prior runs its full procedure, thousands of steps, and the final ELBO takes
    20,000 samples so that 4 standard errors stay far below the margins it checks."""
    model, x = make_linear_gaussian(num_datapoints=20, seed=0)
    mean, var = model.optimal_diagonal(x)
    log_px, best_ffg = model.log_marginal(x), model.elbo_diagonal(x, mean, var)
    gap = (log_px - best_ffg).sum()
    family = make_family(name, hidden_size=32)
    result = local_posterior(model, model.posterior_distribution, x, family=family, init="prior",
                             generator=torch.Generator().manual_seed(0))
    est = elbo(model, family.posterior(result.params), x, num_samples=20000,
               generator=torch.Generator().manual_seed(1))
    closed = (est.value - best_ffg).sum() / gap
    stderr = est.stderr.square().sum().sqrt() / gap
    assert closed - 4 * stderr > CLOSED_AT_LEAST[name], (closed, stderr)
    # and it is still a lower bound: no datapoint's ELBO above log p(x) beyond Monte Carlo error
    assert torch.all(est.value < log_px + 4 * est.stderr)


def test_measure_gaps_with_a_local_flow():
    """The Python API: measure_gaps(..., family=...) refines that family; with a flow L[q*] rises
    above the best FFG's exact ELBO, and the approximation gap falls below the FFG's."""
    import gapbench

    model, x = make_linear_gaussian(num_datapoints=10, seed=2)
    mean, var = model.optimal_diagonal(x)
    best_ffg = model.elbo_diagonal(x, mean, var).mean()
    ffg_gap = model.log_marginal(x).mean() - best_ffg

    def encoder(x):  # an amortized FFG that is off by a shift
        m, v = model.optimal_diagonal(x)
        return Independent(Normal(m + 0.3, v.sqrt()), 1)

    frame, summary = gapbench.measure_gaps(model, encoder, x, family=make_family("iaf", hidden_size=16),
                                           init="encoder", num_samples=4000)
    assert {"elbo_q", "elbo_q_star", "log_px", "approximation", "amortization", "refine_steps"} <= set(frame)
    elbo_q_star = summary["bounds"]["elbo_q_star"]
    assert elbo_q_star["mean"] > best_ffg + 4 * elbo_q_star["mc_stderr"]
    assert summary["gaps"]["approximation"]["mean"] < ffg_gap
    assert summary["gaps"]["amortization"]["mean"] > 0


def test_a_local_flow_starts_on_top_of_a_given_gaussian():
    """local_posterior(init_from=...): a flow starts at the identity on top of the Gaussian it is given (here
    the best FFG, in closed form): before any step its ELBO is that FFG's exact ELBO, whatever ``init`` says."""
    model, x = make_linear_gaussian(num_datapoints=6, seed=3)
    mean, var = model.optimal_diagonal(x)
    family = make_family("flow", hidden_size=8)
    start = DiagonalGaussian(mean, var.log())
    from gapbench.measure import RefineProcedure
    frozen_start = RefineProcedure.for_flows()._replace(learning_rate=1e-12, max_steps=1)
    result = local_posterior(model, model.posterior_distribution, x, family=family, init="prior",
                             procedure=frozen_start, init_from=start, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(result.params["mean"], mean, rtol=0, atol=1e-6)
    est = elbo(model, family.posterior(result.params), x, num_samples=4000, generator=torch.Generator().manual_seed(1))
    exact = model.elbo_diagonal(x, mean, var)
    assert torch.all((est.value - exact).abs() < 4 * est.stderr + 1e-6), (est.value - exact, est.stderr)


@pytest.mark.slow  # a full refinement of 20 local flows (~40 s)
def test_a_local_flow_on_top_of_the_best_ffg_closes_most_of_its_gap():
    """Started at the identity on top of the best FFG (refine.flow_init = "q_star_ffg"), the auxiliary flow
    closes as much of the FFG's approximation gap as from the prior (CLOSED_AT_LEAST) and never ends below
    where it started (beyond Monte Carlo error). Measured: 0.845 ± 0.002 of the gap closed (from the prior
    0.85) in 765 steps on average."""
    model, x = make_linear_gaussian(num_datapoints=20, seed=0)
    mean, var = model.optimal_diagonal(x)
    log_px, best_ffg = model.log_marginal(x), model.elbo_diagonal(x, mean, var)
    family = make_family("flow", hidden_size=32)
    result = local_posterior(model, model.posterior_distribution, x, family=family, init="prior",
                             init_from=DiagonalGaussian(mean, var.log()), generator=torch.Generator().manual_seed(0))
    est = elbo(model, family.posterior(result.params), x, num_samples=20000, generator=torch.Generator().manual_seed(1))
    gap = (log_px - best_ffg).sum()
    closed, stderr = (est.value - best_ffg).sum() / gap, est.stderr.square().sum().sqrt() / gap
    assert closed - 4 * stderr > CLOSED_AT_LEAST["flow"], (closed, stderr)
    assert torch.all(est.value > best_ffg - 4 * est.stderr - 1e-3)
