"""Per-datapoint random streams: distribution, chunk consistency, independence of the batch."""

import math

import pytest
import torch
from scipy import stats

from gapbench.estimators import AISProcedure, ais, elbo, iwae
from gapbench.measure import RefineProcedure, bounds_of, local_posterior
from gapbench.models import Decoder
from gapbench.posteriors import DatapointStreams, DiagonalGaussian, GaussianEncoder, get_family, standard_normal
from gapbench.random import mix64


def test_mix64_matches_splitmix64_reference():
    # splitmix64.c (Vigna) seeded with 0: the first outputs are mix64(k * 0x9E3779B97F4A7C15), k = 1, 2
    expected = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    gamma = 0x9E3779B97F4A7C15
    for k, value in enumerate(expected, start=1):
        state = (k * gamma) % 2**64
        signed = state - 2**64 if state >= 2**63 else state
        out = int(mix64(torch.tensor([signed]))[0]) % 2**64
        assert out == value


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_and_uniform_have_the_right_distribution(dtype):
    streams = DatapointStreams.from_seed(5, range(40))
    normal = streams.normal((500, 40, 7), dtype=dtype)  # 140,000 values
    assert normal.dtype == dtype
    assert stats.kstest(normal.flatten().double().numpy(), "norm").pvalue > 1e-3
    n = normal.numel()
    assert abs(float(normal.mean())) < 4 / math.sqrt(n)
    assert abs(float(normal.var()) - 1) < 4 * math.sqrt(2 / n)
    uniform = streams.uniform((500, 40), dtype=dtype)
    assert float(uniform.min()) > 0 and float(uniform.max()) < 1
    assert stats.kstest(uniform.flatten().double().numpy(), "uniform").pvalue > 1e-3


def test_streams_of_neighbouring_datapoints_and_values_are_uncorrelated():
    values = DatapointStreams.from_seed(0, range(2)).normal((20000, 2, 3)).double()  # (K, 2, 3)
    bound = 4 / math.sqrt(values.shape[0])  # four standard errors of a correlation near 0
    pairs = [(values[:, 0, 0], values[:, 1, 0]), (values[:, 0, 0], values[:, 0, 1]),
             (values[:, 0, 1], values[:, 0, 2]), (values[:-1, 0, 0], values[1:, 0, 0])]
    for a, b in pairs:
        assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < bound


@pytest.mark.parametrize("size", [1, 2, 5, 50])
def test_chunks_give_the_same_numbers_as_one_draw(size):
    whole = DatapointStreams.from_seed(3, range(4)).normal((9, 4, size))
    streams = DatapointStreams.from_seed(3, range(4))
    parts = torch.cat([streams.normal((k, 4, size)) for k in (2, 3, 4)])
    assert torch.equal(whole, parts)


def test_a_datapoint_draws_the_same_numbers_in_any_batch():
    indices = [7, 2, 11, 5]
    batch = DatapointStreams.from_seed(9, indices).normal((6, 4, 3))  # (K, B, Z)
    alone = DatapointStreams.from_seed(9, [11]).normal((6, 1, 3))
    reordered = DatapointStreams.from_seed(9, [5, 11]).normal((6, 2, 3))
    assert torch.equal(batch[:, 2:3], alone)
    assert torch.equal(batch[:, [3, 2]], reordered)
    assert not torch.equal(batch[:, 0], batch[:, 1])
    assert not torch.equal(batch, DatapointStreams.from_seed(10, indices).normal((6, 4, 3)))


def test_select_shares_counters_and_state_replays():
    streams = DatapointStreams.from_seed(1, range(3))
    reference = DatapointStreams.from_seed(1, range(3))
    subset = streams.select(torch.tensor([0, 2]))
    first = subset.normal((2, 2, 4))
    assert torch.equal(first, reference.normal((2, 3, 4))[:, [0, 2]])
    state = subset.get_state()
    again = subset.normal((1, 2, 4))
    subset.set_state(state)
    assert torch.equal(subset.normal((1, 2, 4)), again)
    # datapoint 1 drew nothing; 0 and 2 moved on in the full set
    assert torch.equal(streams.normal((1, 3, 4))[:, 1], DatapointStreams.from_seed(1, [1]).normal((1, 1, 4))[:, 0])


def test_standard_normal_and_wrong_batch_sizes():
    streams = DatapointStreams.from_seed(2, range(3))
    assert torch.equal(standard_normal((4, 3, 2), generator=streams),
                       DatapointStreams.from_seed(2, range(3)).normal((4, 3, 2)))
    with pytest.raises(ValueError, match="hold 3 datapoints"):
        streams.normal((4, 5, 2))


def test_estimators_with_streams_match_closed_forms(linear_gaussian):
    model, x = linear_gaussian
    num = x.shape[0]
    # the exact posterior (a torch MultivariateNormal, sampled through fork_seed) makes every weight p(x)
    exact = iwae(model, model.posterior_distribution(x), x, num_samples=64,
                 generator=DatapointStreams.from_seed(0, range(num)))
    assert torch.allclose(exact.value, model.log_marginal(x), atol=1e-8)
    mean, var = model.optimal_diagonal(x)
    q = DiagonalGaussian(mean, var.log())
    estimate = elbo(model, q, x, num_samples=4000, generator=DatapointStreams.from_seed(1, range(num)))
    z_elbo = (estimate.value - model.elbo_diagonal(x, mean, var)) / estimate.stderr
    zeros = torch.zeros_like(mean)
    rough = iwae(model, DiagonalGaussian(zeros, zeros), x, num_samples=20000,
                 generator=DatapointStreams.from_seed(2, range(num)))
    z_iwae = (rough.value - model.log_marginal(x)) / rough.stderr
    assert bool((z_elbo.abs() < 5).all()) and bool((z_iwae.abs() < 5).all())


def _evaluate(decoder, encoder, x, indices):
    """Per-datapoint ELBO/IWAE of q, refinement, ELBO of q* and AIS of the datapoints ``indices``."""
    batch = x[indices]
    pair = bounds_of(decoder, encoder(batch), batch, num_samples=150, chunk_size=7,
                     generator=DatapointStreams.from_seed(1, indices))
    streams = DatapointStreams.from_seed(2, indices)
    result = local_posterior(decoder, encoder, batch, init="encoder",
                             procedure=RefineProcedure(max_steps=150, check_every=25), generator=streams)
    local = bounds_of(decoder, get_family("ffg").posterior(result.params), batch, num_samples=150,
                      chunk_size=None, generator=streams)
    forward = ais(decoder, batch, init=None, latent_size=4, procedure=AISProcedure(num_chains=3, num_steps=15),
                  generator=DatapointStreams.from_seed(3, indices))
    values = torch.stack([pair.elbo.value, pair.iwae.value, local.elbo.value, forward.value], 1)
    return values, result.num_steps


def test_a_datapoint_gets_the_same_results_in_any_batch():
    torch.manual_seed(0)
    decoder, encoder = Decoder(16, 4, (12,), "elu"), GaussianEncoder(16, 4, (12,), "elu")
    x = (torch.rand(10, 16) < 0.4).float()
    full, steps = _evaluate(decoder, encoder, x, list(range(10)))
    for indices in ([7, 2, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0], [4]):
        part, part_steps = _evaluate(decoder, encoder, x, indices)
        assert torch.equal(part_steps, steps[indices])
        # equal up to float32 rounding: BLAS sums a row differently for another number of rows
        assert torch.allclose(part, full[indices], rtol=1e-5, atol=1e-5)
    assert steps.unique().numel() > 1  # datapoints stopped at different steps: the active set shrank


def _evaluate_merged(indices):
    """Per-datapoint numbers of the features merged from main, all with per-datapoint streams: a two-layer
    model (its q(z1|x) q(z2|z1), AIS from its ancestral prior, a local hierarchical family started from
    random layers), a planar local family at random initial weights, AIS from a flow encoder's fitted
    diagonal Gaussian, and the refinement curve."""
    from gapbench.inference.curves import refinement_curve
    from gapbench.estimators.ais import DEFAULT_AIS
    from gapbench.measure import ais_of
    from gapbench.models import HierarchicalDecoder
    from gapbench.posteriors import HierarchicalEncoder, HierarchicalFamily, make_encoder, make_family

    torch.manual_seed(0)
    x = (torch.rand(8, 16) < 0.4).float()
    batch = x[indices]
    decoder2 = HierarchicalDecoder(16, 3, 2, (12,), (6,))
    encoder2 = HierarchicalEncoder(16, 3, 2, (12,), (6,))
    decoder, encoder = Decoder(16, 4, (12,), "elu"), GaussianEncoder(16, 4, (12,), "elu")
    flow_encoder = make_encoder("planar", 16, 4, (12,), num_steps=2)

    def streams(seed):
        return DatapointStreams.from_seed(seed, indices)

    procedure = RefineProcedure(max_steps=30, check_every=10)
    two_layer = bounds_of(decoder2, encoder2(batch), batch, num_samples=50, chunk_size=None, generator=streams(1))
    prior_ais = ais(decoder2, batch, init=None, procedure=AISProcedure(num_chains=3, num_steps=8),
                    generator=streams(2))
    hier = local_posterior(decoder2, encoder2, batch, family=HierarchicalFamily(3, 2, (6,)), init="prior",
                           procedure=procedure, generator=streams(3))
    planar = local_posterior(decoder, encoder, batch, family=make_family("planar", num_steps=2), init="prior",
                             procedure=procedure, generator=streams(4))
    flow_ais = ais_of(decoder, batch, init="encoder", encoder=flow_encoder,
                      procedure=DEFAULT_AIS._replace(num_chains=3, num_steps=8),
                      generator=streams(5))
    curve = refinement_curve(decoder, encoder, batch, steps=(0, 2, 5), eval_samples=40, generator=streams(6))
    values = torch.cat([two_layer.elbo.value[:, None], prior_ais.value[:, None],
                        hier.params["weight_0"].flatten(1), planar.params["w"].flatten(1), flow_ais.value[:, None],
                        curve.elbo.T], 1)
    return values, curve, (decoder, encoder, batch)


def test_merged_features_give_a_datapoint_the_same_results_in_any_batch():
    full, curve, (decoder, encoder, batch) = _evaluate_merged(list(range(8)))
    for indices in ([6, 1, 3], [5]):
        part, _, _ = _evaluate_merged(indices)
        assert torch.allclose(part, full[indices], rtol=1e-5, atol=1e-5)
    # the curve's evaluation noise is replayed at every k: L_0 is the encoder's ELBO with the forked streams
    forked = DatapointStreams.from_seed(6, range(8)).fork()
    first = elbo(decoder, encoder(batch), batch, num_samples=40, generator=forked)
    assert torch.allclose(curve.elbo[0], first.value, rtol=1e-6, atol=1e-6)
    assert bool((curve.gain_stderr[0] == 0).all()) and bool((curve.gain_stderr[1:] > 0).all())
