"""Semi-amortized training (Kim et al., 2018): K = 0 is the plain VAE, the unrolled gradient is the
derivative of the refined ELBO through the steps, the stop-gradient variant trains the encoder on
its own ELBO, the inner steps raise the exact ELBO of a linear-Gaussian model, and training resumes."""

import io

import pytest
import torch
from conftest import make_linear_gaussian

from gapbench.runner.config import ConfigError, parse_config
from gapbench.data import load_dataset
from gapbench.models import Decoder
from gapbench.posteriors import DiagonalGaussian, GaussianEncoder
from gapbench.inference.semi_amortized import SemiAmortized, beta_elbo, refine_steps, semi_amortized_gradients, svi_step
from gapbench.train import negative_elbo, train


def tiny_networks(seed=0, dtype=torch.float64):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        decoder, encoder = Decoder(12, 3, (8,)).to(dtype), GaussianEncoder(12, 3, (8,)).to(dtype)
    x = torch.bernoulli(torch.full((5, 12), 0.4, dtype=dtype), generator=torch.Generator().manual_seed(seed))
    return decoder, encoder, x


def gradients(decoder, encoder):
    return [p.grad.clone() for p in list(decoder.parameters()) + list(encoder.parameters())]


def test_zero_steps_give_the_plain_vae_gradients():
    """K = 0, unrolled: the gradients of the semi-amortized loss are the plain VAE's, same sample."""
    decoder, encoder, x = tiny_networks()
    loss, plain_elbo = negative_elbo(decoder, encoder, x, beta=0.3, generator=torch.Generator().manual_seed(4))
    loss.backward()
    plain = gradients(decoder, encoder)
    decoder.zero_grad(), encoder.zero_grad()
    semi_elbo = semi_amortized_gradients(decoder, encoder, x, settings=SemiAmortized(0, 0.5, 5.0, "unrolled"),
                                         beta=0.3, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(semi_elbo, plain_elbo, rtol=0, atol=1e-12)
    for a, b in zip(gradients(decoder, encoder), plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _train(semi_amortized=None, epochs=3, resume_from=None, on_checkpoint=None):
    data = load_dataset("digits")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        decoder, encoder = Decoder(64, 4, (32,)), GaussianEncoder(64, 4, (32,))
    extra = {} if semi_amortized is None else {"semi_amortized": semi_amortized}
    result = train(decoder, encoder, data.train[:300], data.valid[:100], epochs=epochs, batch_size=50,
                   learning_rate=3e-3, adam_eps=1e-8, warmup_epochs=1, schedule="constant",
                   binarization="dynamic", threshold=0.5, valid_every=1, valid_num_samples=5,
                   early_stopping_patience=0, generator=torch.Generator().manual_seed(1), progress=False,
                   resume_from=resume_from, on_checkpoint=on_checkpoint, checkpoint_seconds=0, **extra)
    return result


def test_zero_steps_train_exactly_the_plain_vae():
    plain = _train()
    for gradient in ("unrolled", "stop"):
        semi = _train(SemiAmortized(0, 0.5, 1.0, gradient))
        for key, value in plain.decoder_state.items():
            assert torch.equal(value, semi.decoder_state[key]), key
        for key, value in plain.encoder_state.items():
            assert torch.equal(value, semi.encoder_state[key]), key
        assert [r[:5] for r in semi.history] == [r[:5] for r in plain.history]
    # and K > 0 trains another model
    refined = _train(SemiAmortized(2, 0.01, 5.0, "unrolled"))
    assert not torch.equal(refined.encoder_state["net.0.weight"], plain.encoder_state["net.0.weight"])


def refined_objective(decoder, encoder, x, *, settings, beta, seed):
    """ELBO_beta(lambda_K(phi)) with the noise semi_amortized_gradients draws from ``seed``, as a
    plain function of the encoder (no gradient needed: for finite differences)."""
    generator = torch.Generator().manual_seed(seed)
    q = encoder(x)
    q = DiagonalGaussian(q.mean.detach().requires_grad_(True), q.log_var.detach().requires_grad_(True))
    q = refine_steps(decoder, q, x, num_steps=settings.num_steps, learning_rate=settings.learning_rate,
                     max_grad_norm=settings.max_grad_norm, beta=beta, create_graph=False, generator=generator)
    value, _ = beta_elbo(decoder, DiagonalGaussian(q.mean.detach(), q.log_var.detach()), x, beta=beta,
                         generator=generator)
    return float(value.detach().mean())


def test_unrolled_encoder_gradient_is_the_derivative_through_the_steps():
    """Central differences of the refined ELBO (same noise) in a few encoder weights, float64."""
    decoder, encoder, x = tiny_networks(seed=2)
    settings = SemiAmortized(3, 0.05, 1e6, "unrolled")  # no clipping: a smooth function
    semi_amortized_gradients(decoder, encoder, x, settings=settings, beta=0.7, generator=torch.Generator().manual_seed(9))
    weight = encoder.net[0].weight
    analytic = -weight.grad  # the gradient of the loss = -objective
    h = 1e-6
    for i, j in ((0, 0), (3, 5), (7, 11)):
        with torch.no_grad():
            weight[i, j] += h
        up = refined_objective(decoder, encoder, x, settings=settings, beta=0.7, seed=9)
        with torch.no_grad():
            weight[i, j] -= 2 * h
        down = refined_objective(decoder, encoder, x, settings=settings, beta=0.7, seed=9)
        with torch.no_grad():
            weight[i, j] += h
        numeric = (up - down) / (2 * h)
        assert analytic[i, j].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)
    # the decoder's gradient is the partial derivative at fixed lambda_K: the plain ELBO gradient at
    # the refined parameters, on the same sample
    generator = torch.Generator().manual_seed(9)
    q = encoder(x)
    q_k = refine_steps(decoder, q, x, num_steps=3, learning_rate=0.05, max_grad_norm=1e6, beta=0.7,
                       create_graph=False, generator=generator)
    fixed = DiagonalGaussian(q_k.mean.detach(), q_k.log_var.detach())
    value, _ = beta_elbo(decoder, fixed, x, beta=0.7, generator=generator)
    expected = torch.autograd.grad(-value.mean(), list(decoder.parameters()))
    for p, g in zip(decoder.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


def test_stop_gradient_trains_the_encoder_on_its_own_elbo():
    """With the stop-gradient the encoder's gradient does not depend on the inner step size (the
    refined parameters are constants for it); the decoder's does. Unrolled, both do."""
    def grads(gradient, learning_rate):
        decoder, encoder, x = tiny_networks(seed=5)
        semi_amortized_gradients(decoder, encoder, x, settings=SemiAmortized(2, learning_rate, 5.0, gradient),
                                 beta=1.0, generator=torch.Generator().manual_seed(3))
        return [p.grad for p in decoder.parameters()], [p.grad for p in encoder.parameters()]

    dec_a, enc_a = grads("stop", 0.01)
    dec_b, enc_b = grads("stop", 0.1)
    for a, b in zip(enc_a, enc_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not all(torch.allclose(a, b) for a, b in zip(dec_a, dec_b))
    _, enc_c = grads("unrolled", 0.01)
    _, enc_d = grads("unrolled", 0.1)
    assert not all(torch.allclose(a, b) for a, b in zip(enc_c, enc_d))
    # and it is the plain ELBO gradient of the encoder with the sample drawn after the K + 1 others
    decoder, encoder, x = tiny_networks(seed=5)
    generator = torch.Generator().manual_seed(3)
    q0 = encoder(x)
    for _ in range(3):  # K inner samples and the refined ELBO's sample
        q0.rsample_and_log_prob(1, generator=generator)
    own, _ = beta_elbo(decoder, q0, x, beta=1.0, generator=generator)
    expected = torch.autograd.grad(-own.mean(), list(encoder.parameters()))
    for a, b in zip(enc_a, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_inner_steps_raise_the_exact_elbo_of_a_linear_gaussian_model():
    """SGD on (mu, log_var) from a poor start raises the closed-form ELBO of every datapoint, and a
    clipped step moves no datapoint further than learning_rate * max_grad_norm."""
    model, x = make_linear_gaussian(data_size=10, latent_size=3, num_datapoints=50, seed=1)
    mean_opt, var_opt = model.optimal_diagonal(x)
    start = DiagonalGaussian((mean_opt + 1.0).requires_grad_(True), (var_opt * 3).log().requires_grad_(True))
    before = model.elbo_diagonal(x, start.mean.detach(), start.log_var.detach().exp())
    after_q = refine_steps(model, start, x, num_steps=30, learning_rate=0.02, max_grad_norm=5.0, beta=1.0,
                           create_graph=False, generator=torch.Generator().manual_seed(0))
    after = model.elbo_diagonal(x, after_q.mean.detach(), after_q.log_var.detach().exp())
    best = model.elbo_diagonal(x, mean_opt, var_opt)
    assert torch.all(after > before)
    assert float((after - before).mean()) > 0.5 * float((best - before).mean())  # most of the way
    step = svi_step(model, start, x, learning_rate=0.1, max_grad_norm=0.5, beta=1.0, create_graph=False,
                    generator=torch.Generator().manual_seed(1))
    moved = torch.cat([step.mean - start.mean, step.log_var - start.log_var], -1).norm(dim=-1)  # (B,)
    assert torch.all(moved <= 0.1 * 0.5 + 1e-12) and torch.any(moved > 0.1 * 0.5 - 1e-9)


def test_semi_amortized_training_resumes_exactly():
    settings = SemiAmortized(2, 0.01, 5.0, "unrolled")
    snapshots = []
    whole = _train(settings, epochs=3, on_checkpoint=snapshots.append)
    buffer = io.BytesIO()
    torch.save(snapshots[0], buffer)
    buffer.seek(0)
    resumed = _train(settings, epochs=3, resume_from=torch.load(buffer, weights_only=True))
    for key, value in whole.encoder_state.items():
        assert torch.equal(value, resumed.encoder_state[key]), key
    assert [r[:5] for r in resumed.history] == [r[:5] for r in whole.history]


def test_semi_amortized_config():
    train = parse_config({"name": "x", "train": {"semi_amortized_steps": 10, "semi_amortized_gradient": "stop"}}).train
    assert train.semi_amortized() == SemiAmortized(10, SemiAmortized().learning_rate, 5.0, "stop")
    assert parse_config({"name": "x"}).train.semi_amortized().num_steps == 0
    for bad in ({"semi_amortized_steps": -1}, {"semi_amortized_gradient": "through"}, {"semi_amortized_lr": 0.0}):
        with pytest.raises(ConfigError, match="semi_amortized"):
            parse_config({"name": "x", "train": bad})
    for model in ({"posterior": "flow"}, {"kind": "hierarchical"}):  # no single FFG to refine
        with pytest.raises(ConfigError, match="refine the encoder's diagonal Gaussian"):
            parse_config({"name": "x", "model": model, "train": {"semi_amortized_steps": 2}})
        with pytest.raises(ConfigError, match="curve.enabled = true refine"):
            parse_config({"name": "x", "model": model, "curve": {"enabled": True}})
