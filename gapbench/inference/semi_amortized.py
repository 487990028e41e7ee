"""Semi-amortized training: the encoder's output refined by K SVI steps inside every training step.

Kim, Wiseman, Miller, Sontag & Rush (2018), "Semi-Amortized Variational Autoencoders": the encoder
gives lambda_0 = (mu, log sigma^2) = enc_phi(x); K steps of gradient ascent on the ELBO refine it,

    lambda_k = lambda_{k-1} + alpha * clip(grad_lambda ELBO_beta(lambda_{k-1}, theta; x, eps_k)),  k = 1..K,

each with one reparameterised sample eps_k, and the decoder is trained on the refined ELBO.
``clip`` rescales each datapoint's gradient (over mu and log sigma^2 together) to norm at most
``max_grad_norm`` (doing it per datapoint keeps the datapoints of a batch independent).
ELBO_beta = log p(x|z) + beta (log p(z) - log q(z)), a one-sample estimate, carries the KL warm-up
weight beta of the training step, in the inner steps as in the loss.

Two gradients, ``gradient``:

- ``"unrolled"`` (SA-VAE): the steps keep their autograd graph (``create_graph=True``), so the encoder
  is trained on the refined ELBO through the K steps: phi follows d ELBO_beta(lambda_K(phi), theta) / d phi
  (Hessian-vector products of the inner ELBO). The decoder follows the partial derivative
  d ELBO_beta(lambda_K, theta) / d theta with lambda_K held fixed: no gradient reaches theta through
  the inner steps.
- ``"stop"`` (a stop-gradient, as Kim et al.'s ``train_n2n = 0`` option with ``train_kl = 0``):
  lambda_K is a constant for the encoder. The encoder is trained on its own ELBO,
  d ELBO_beta(lambda_0(phi), theta) / d phi, from one sample of its own; the decoder on the refined
  ELBO, d ELBO_beta(lambda_K, theta) / d theta.

Where this differs from Kim et al.'s published code (harvardnlp/sa-vae, ``train_img.py`` and
``optim_n2n.py``): their inner steps (images) use momentum 0.5, step size 1, 20 steps, the mean's
and the log-variance's gradients each clipped over the whole batch at norm 5, the KL term in closed
form, and Hessian-vector products by finite differences; and by default (``acc_param_grads``) they
also accumulate the decoder's gradient through the inner steps (the total derivative in theta),
which ``"unrolled"`` here does not.

With K = 0 both are the plain VAE's gradients (``lambda_K = lambda_0``); ``gapbench.train`` takes the
plain VAE's code path then, so K = 0 trains exactly the plain VAE, number for number.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from gapbench.posteriors import DiagonalGaussian, as_posterior

GRADIENTS = ("unrolled", "stop")


class SemiAmortized(NamedTuple):
    """Settings of semi-amortized training (the ``train.semi_amortized_*`` config keys)."""

    num_steps: int = 0  # K, SGD steps on (mu, log_var) per training step (0: the plain VAE)
    learning_rate: float = 0.01  # alpha, the inner SGD step size (0.01: the best of 0.003-0.05 on digits)
    max_grad_norm: float = 5.0  # per-datapoint clipping of the inner gradient
    gradient: str = "unrolled"  # "unrolled" (through the steps) or "stop" (stop-gradient)


def beta_elbo(decoder, q: DiagonalGaussian, x: torch.Tensor, *, beta: float,
              generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One-sample ELBO_beta = log p(x|z) + beta (log p(z) - log q(z)) and the plain ELBO, each (B,).

    x is (B, D); q holds (B, Z) parameters; z ~ q is reparameterised, so both carry gradients to
    q's parameters and the decoder's."""
    z, log_q = q.rsample_and_log_prob(1, generator=generator)  # (1, B, Z), (1, B)
    log_lik = decoder.log_likelihood(x, z)  # (1, B)
    kl_term = decoder.log_prior(z) - log_q  # (1, B)
    return (log_lik + beta * kl_term)[0], (log_lik + kl_term)[0]


def svi_step(decoder, q: DiagonalGaussian, x: torch.Tensor, *, learning_rate: float, max_grad_norm: float,
             beta: float, create_graph: bool, generator: torch.Generator | None) -> DiagonalGaussian:
    """One clipped SGD ascent step on ELBO_beta for every datapoint: lambda + alpha * clip(grad).

    ``q.mean`` and ``q.log_var`` (B, Z) must require gradients. With ``create_graph`` the new
    parameters are differentiable functions of the old ones (and of the decoder's weights)."""
    objective, _ = beta_elbo(decoder, q, x, beta=beta, generator=generator)  # (B,)
    grad_mean, grad_log_var = torch.autograd.grad(objective.sum(), (q.mean, q.log_var), create_graph=create_graph)
    norm = (grad_mean.square().sum(-1) + grad_log_var.square().sum(-1)).clamp_min(1e-24).sqrt()  # (B,)
    scale = (max_grad_norm / norm).clamp(max=1.0).unsqueeze(-1) * learning_rate  # (B, 1)
    return DiagonalGaussian(q.mean + scale * grad_mean, q.log_var + scale * grad_log_var)


def refine_steps(decoder, q: DiagonalGaussian, x: torch.Tensor, *, num_steps: int, learning_rate: float,
                 max_grad_norm: float, beta: float, create_graph: bool,
                 generator: torch.Generator | None) -> DiagonalGaussian:
    """lambda_K from lambda_0 = q by ``num_steps`` :func:`svi_step` s. Without ``create_graph`` the
    steps start from a detached copy and the result carries no graph to q."""
    if not create_graph:
        q = DiagonalGaussian(q.mean.detach().requires_grad_(True), q.log_var.detach().requires_grad_(True))
    for _ in range(num_steps):
        q = svi_step(decoder, q, x, learning_rate=learning_rate, max_grad_norm=max_grad_norm, beta=beta,
                     create_graph=create_graph, generator=generator)
        if not create_graph:
            q = DiagonalGaussian(q.mean.detach().requires_grad_(True), q.log_var.detach().requires_grad_(True))
    return q


def semi_amortized_gradients(decoder: nn.Module, encoder: nn.Module, x: torch.Tensor, *, settings: SemiAmortized,
                             beta: float, generator: torch.Generator) -> torch.Tensor:
    """Set ``.grad`` of every decoder and encoder parameter to the gradient of the loss (the negative
    objective, mean over the batch) that ``settings.gradient`` defines (module docstring).

    x : (B, D). Returns the plain one-sample ELBO of the refined posterior lambda_K per datapoint,
    (B,), detached, for logging. Draws, in order: the K inner samples, the refined ELBO's sample and,
    for "stop", the encoder ELBO's sample.
    """
    if settings.gradient not in GRADIENTS:
        raise ValueError(f"unknown semi-amortized gradient {settings.gradient!r}; choose one of {GRADIENTS}")
    q0 = as_posterior(encoder(x))
    if not isinstance(q0, DiagonalGaussian):
        raise TypeError("semi-amortized training refines a diagonal Gaussian (mu, log_var); the encoder "
                         f"returned {type(q0).__name__}")
    unrolled = settings.gradient == "unrolled"
    q_k = refine_steps(decoder, q0, x, num_steps=settings.num_steps, learning_rate=settings.learning_rate,
                       max_grad_norm=settings.max_grad_norm, beta=beta, create_graph=unrolled, generator=generator)
    decoder_params = [p for p in decoder.parameters() if p.requires_grad]
    encoder_params = [p for p in encoder.parameters() if p.requires_grad]
    # the decoder: d/d theta of the refined ELBO at fixed lambda_K (both variants)
    fixed = DiagonalGaussian(q_k.mean.detach(), q_k.log_var.detach())
    noise = generator.get_state()
    refined, elbo_k = beta_elbo(decoder, fixed, x, beta=beta, generator=generator)  # (B,)
    decoder_grads = torch.autograd.grad(-refined.mean(), decoder_params)
    if unrolled:  # the encoder: through the K steps, on the same sample of the refined ELBO
        generator.set_state(noise)
        through, _ = beta_elbo(decoder, q_k, x, beta=beta, generator=generator)  # equal to ``refined``
        encoder_loss = -through.mean()
    else:  # the encoder: its own ELBO
        own, _ = beta_elbo(decoder, q0, x, beta=beta, generator=generator)
        encoder_loss = -own.mean()
    encoder_grads = torch.autograd.grad(encoder_loss, encoder_params)
    for param, grad in zip(decoder_params + encoder_params, decoder_grads + encoder_grads):
        param.grad = grad
    return elbo_k.detach()
