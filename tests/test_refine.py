"""Batched local refinement against the analytic optimal diagonal Gaussian."""

import math

import pytest
import torch

import gapbench

from gapbench.estimators import elbo
from gapbench.measure import RefineProcedure, local_posterior
from gapbench.posteriors import DiagonalGaussianFamily
from gapbench.inference.refine import refine

from conftest import make_linear_gaussian


def exact_encoder(model):
    return lambda x: model.posterior_distribution(x)


@pytest.mark.parametrize("init", ["prior", "encoder"])
def test_refinement_reaches_analytic_optimum(init):
    model, x = make_linear_gaussian(data_size=20, latent_size=4, num_datapoints=40, seed=3)
    mean_opt, var_opt = model.optimal_diagonal(x)
    best = model.elbo_diagonal(x, mean_opt, var_opt)  # analytic L[q*], (B,)
    if init == "encoder":  # a diagonal-Gaussian encoder that is off by a shift
        def encoder(x):
            m, v = model.optimal_diagonal(x)
            return torch.distributions.Independent(torch.distributions.Normal(m + 0.7, (2 * v).sqrt()), 1)
    else:
        encoder = exact_encoder(model)
    result = local_posterior(model, encoder, x, init=init, procedure=RefineProcedure(),
                             generator=torch.Generator().manual_seed(0))
    assert result.is_converged.all()
    mean, log_var = result.params["mean"], result.params["log_var"]
    # the closed-form ELBO of the refined posterior: within 0.01 nats of the optimum, every datapoint
    shortfall = best - model.elbo_diagonal(x, mean, log_var.exp())
    assert torch.all(shortfall > -1e-9) and torch.all(shortfall < 0.01), shortfall.max()
    # the 5000-sample L[q*] estimate agrees with the analytic value within Monte Carlo error
    est = elbo(model, DiagonalGaussianFamily().posterior(result.params), x, num_samples=5000,
               generator=torch.Generator().manual_seed(1))
    z_scores = (est.value - best) / torch.sqrt(est.stderr**2 + shortfall.max() ** 2)
    assert torch.all(z_scores.abs() < 4.5), z_scores


def test_paper_procedure_reaches_optimum_too():
    model, x = make_linear_gaussian(data_size=10, latent_size=2, num_datapoints=8, seed=4)
    mean_opt, var_opt = model.optimal_diagonal(x)
    best = model.elbo_diagonal(x, mean_opt, var_opt)
    result = local_posterior(model, exact_encoder(model), x, procedure=RefineProcedure.paper(),
                             generator=torch.Generator().manual_seed(0))
    shortfall = best - model.elbo_diagonal(x, result.params["mean"], result.params["log_var"].exp())
    assert torch.all(shortfall < 0.02)
    # the paper's rule: a datapoint stops at a multiple of the check interval, after > 10 bad checks
    assert torch.all(result.num_steps % 100 == 0) and torch.all(result.num_steps >= 1200)


def test_datapoints_stop_on_their_own():
    model, x = make_linear_gaussian(data_size=15, latent_size=3, num_datapoints=30, seed=5)
    x = torch.cat([x, x[:5] * 40.0])  # five far-away datapoints need many more steps from the prior
    result = local_posterior(model, exact_encoder(model), x, procedure=RefineProcedure(),
                             generator=torch.Generator().manual_seed(0))
    steps = result.num_steps
    assert steps.min() < steps.max()
    assert steps[-5:].float().mean() > steps[:30].float().mean()
    # the history has a column per datapoint, NaN after it stopped
    assert result.history.shape[1] == x.shape[0]
    last_check = steps // RefineProcedure().check_every
    for b in range(x.shape[0]):
        assert torch.isfinite(result.history[: last_check[b], b]).all()
        assert torch.isnan(result.history[last_check[b]:, b]).all()


def test_max_steps_marks_unconverged():
    model, x = make_linear_gaussian(num_datapoints=4)
    family = DiagonalGaussianFamily()
    init = family.init_params(4, model.latent_size, like=x)
    result = refine(model, x, family=family, init_params=init, num_samples=5, learning_rate=1e-4,
                    max_steps=30, check_every=10, patience=3, generator=torch.Generator().manual_seed(0))
    assert torch.all(result.num_steps == 30) and not result.is_converged.any()
    assert result.history.shape == (3, 4)
    with pytest.raises(ValueError, match="max_steps"):
        refine(model, x, family=family, init_params=init, num_samples=5, learning_rate=1e-2, max_steps=0,
               check_every=10, patience=3, generator=None)
    with pytest.raises(ValueError, match="gradient"):
        refine(model, x, family=family, init_params=init, num_samples=5, learning_rate=1e-2, max_steps=5,
               check_every=10, patience=3, gradient="score", generator=None)


def test_model_parameters_are_untouched():
    from gapbench.models import Decoder
    from gapbench.posteriors import GaussianEncoder

    torch.manual_seed(0)
    decoder, encoder = Decoder(6, 2, (8,)), GaussianEncoder(6, 2, (8,))
    before = [p.clone() for p in decoder.parameters()]
    x = torch.bernoulli(torch.full((5, 6), 0.5), generator=torch.Generator().manual_seed(0))
    local_posterior(decoder, encoder, x, procedure=RefineProcedure(max_steps=20),
                    generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(before, decoder.parameters()))
    assert all(p.grad is None and p.requires_grad for p in decoder.parameters())


def test_paired_check_replays_the_same_noise():
    """At the anchor itself the paired difference is exactly zero: both sides saw the same noise."""
    from gapbench.inference.convergence import convergence_init, paired_check

    model, x = make_linear_gaussian(num_datapoints=5)
    family = DiagonalGaussianFamily()
    params = family.init_params(5, model.latent_size, like=x)
    state = convergence_init(params)._replace(param_sum={k: 10 * v for k, v in params.items()})
    new, info = paired_check(model, family, x, state, check_every=10, check_samples=50, min_improvement=0.0,
                             generator=torch.Generator().manual_seed(0))
    assert not info.is_improved.any() and torch.all(new.num_bad_checks == 1)  # no improvement over itself
    # the optimal diagonal Gaussian is a significant improvement on the prior for every datapoint
    mean_opt, var_opt = model.optimal_diagonal(x)
    better = {"mean": mean_opt, "log_var": var_opt.log()}
    state = state._replace(param_sum={k: 10 * v for k, v in better.items()})
    new, info = paired_check(model, family, x, state, check_every=10, check_samples=50, min_improvement=0.0,
                             generator=torch.Generator().manual_seed(0))
    assert info.is_improved.all() and torch.all(new.num_bad_checks == 0)
    torch.testing.assert_close(new.anchor["mean"], better["mean"])


def test_a_bad_check_decays_the_learning_rate_of_its_row_only():
    """Refinement halves the step size of a datapoint after a check without improvement, and no other's."""
    model, x = make_linear_gaussian(num_datapoints=3)
    family = DiagonalGaussianFamily()
    mean_opt, var_opt = model.optimal_diagonal(x)
    start = {"mean": mean_opt.clone(), "log_var": var_opt.log()}
    start["mean"][0] += 3.0  # far from its optimum, so its first window improves on the start
    result = refine(model, x, family=family, init_params=start, num_samples=5, learning_rate=0.1, max_steps=10,
                    check_every=10, patience=5, lr_decay=0.5, convergence="paired",
                    generator=torch.Generator().manual_seed(0))
    # the others start at their optimum: no window can beat it, so their step size is halved
    torch.testing.assert_close(result.final_learning_rate, torch.tensor([0.1, 0.05, 0.05]))


def test_ffg_steps_are_scaled_by_the_standard_deviation():
    family = DiagonalGaussianFamily()
    params = {"mean": torch.zeros(2, 3), "log_var": torch.log(torch.tensor([[0.01, 1.0, 4.0]] * 2))}
    scale = family.step_scale(params)
    torch.testing.assert_close(scale["mean"], torch.tensor([[0.1, 1.0, 2.0]] * 2))
    assert "log_var" not in scale


class PoisonedModel:
    """A linear-Gaussian model whose likelihood turns NaN for the datapoints in ``poisoned`` once
    their mean drifts past ``limit`` (a stand-in for a decoder that overflows far from the data)."""

    def __init__(self, model, x, poisoned, limit):
        self.model, self.limit = model, limit
        self.is_poisoned = {tuple(x[b].tolist()) for b in poisoned}

    def log_prior(self, z):
        return self.model.log_prior(z)

    def log_likelihood(self, x, z):
        value = self.model.log_likelihood(x, z)  # (K, B)
        rows = torch.tensor([tuple(row.tolist()) in self.is_poisoned for row in x])  # (B,)
        far = z.abs().amax(-1) > self.limit  # (K, B)
        return torch.where(rows & far, torch.nan, value)


def test_a_datapoint_whose_elbo_turns_nan_stops_flagged_and_alone():
    model, x = make_linear_gaussian(data_size=20, latent_size=4, num_datapoints=12, seed=3)
    mean_opt, var_opt = model.optimal_diagonal(x)
    poisoned = [2, 7]
    family = DiagonalGaussianFamily()
    init = family.init_params(12, model.latent_size, like=x)  # from the prior: means start at 0
    result = refine(PoisonedModel(model, x, poisoned, limit=0.5), x, family=family, init_params=init,
                    **RefineProcedure()._asdict(), generator=torch.Generator().manual_seed(0))
    assert result.is_diverged.tolist() == [b in poisoned for b in range(12)]
    assert not result.is_converged[poisoned].any()
    assert torch.all(result.num_steps[poisoned] < 50)  # stopped when the first NaN appeared
    for value in result.params.values():
        assert torch.isfinite(value).all()  # the last parameters with a finite ELBO estimate
    # every other datapoint reached its optimum as if nothing had happened
    healthy = [b for b in range(12) if b not in poisoned]
    assert result.is_converged[healthy].all()
    best = model.elbo_diagonal(x, mean_opt, var_opt)[healthy]
    got = model.elbo_diagonal(x[healthy], result.params["mean"][healthy], result.params["log_var"][healthy].exp())
    assert torch.all(best - got < 0.01)


def test_measure_gaps_flags_the_faulty_datapoints():
    model, x = make_linear_gaussian(data_size=20, latent_size=4, num_datapoints=10, seed=3)
    frame, summary = gapbench.measure_gaps(PoisonedModel(model, x, [4], limit=0.5), exact_encoder(model), x,
                                           num_samples=500, init="prior",
                                           generator=torch.Generator().manual_seed(0))
    assert frame["refine_diverged"].tolist() == [b == 4 for b in range(10)]
    assert frame["fault"][4].startswith("elbo_q_not_finite") and "refine_diverged" in frame["fault"][4]
    assert (frame["fault"].drop(index=4) == "ok").all()
    assert summary["faults"]["num_faulty"] == 1 and summary["faults"]["counts"]["refine_diverged"] == 1
    for block in ("bounds", "gaps"):
        for entry in summary[block].values():
            assert entry["num_datapoints"] == 9 and math.isfinite(entry["mean"])
