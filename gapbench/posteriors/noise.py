"""Standard-normal noise whose values do not depend on how the samples are chunked."""

from __future__ import annotations

import math

import torch

from gapbench.random import DatapointStreams

RandomStream = torch.Generator | DatapointStreams  # what every ``generator=`` keyword accepts

# torch's CPU float32 normal sampler fills blocks of 16 values; a draw whose size is not a multiple
# of 16 redraws its tail, so two consecutive draws differ from one draw of the combined size. Padding
# each sample's slice to a multiple of 16 keeps every draw aligned, so K samples drawn at once equal
# the same K samples drawn in consecutive chunks (checked in tests/test_posteriors.py).
_BLOCK = 16


def standard_normal(
    shape: tuple[int, ...],
    *,
    generator: RandomStream | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw N(0, I) noise of ``shape = (K, *rest)``, consistent under chunking along K.

    Drawing ``(K1 + K2, *rest)`` gives the same numbers as drawing ``(K1, *rest)`` then
    ``(K2, *rest)`` from the same generator (on CPU), so chunked and unchunked estimators agree.

    Parameters
    ----------
    shape : (K, *rest)
    generator : the random stream (keyword-only; ``None`` uses torch's global stream); with
        :class:`DatapointStreams` the datapoints lie along dimension 1 and each draws from its own

    Returns
    -------
    Tensor of shape ``shape``.
    """
    if isinstance(generator, DatapointStreams):
        return generator.normal(shape, batch_dim=1, dtype=dtype)
    num_samples, rest = shape[0], tuple(shape[1:])
    per_sample = math.prod(rest)
    padded = -(-per_sample // _BLOCK) * _BLOCK  # round up to a multiple of the block
    noise = torch.randn(num_samples, padded, generator=generator, dtype=dtype, device=device)  # (K, P)
    if padded != per_sample:
        noise = noise[:, :per_sample]  # (K, prod(rest))
    return noise.reshape(num_samples, *rest)  # (K, *rest)


def random_normal(shape: tuple[int, ...], *, generator: RandomStream | None, dtype: torch.dtype,
                  device: torch.device | str | None, batch_dim: int) -> torch.Tensor:
    """``torch.randn(shape)`` from ``generator``; with :class:`DatapointStreams`, each datapoint
    (along ``batch_dim``) draws from its own stream."""
    if isinstance(generator, DatapointStreams):
        return generator.normal(shape, batch_dim=batch_dim, dtype=dtype)
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


def random_uniform(shape: tuple[int, ...], *, generator: RandomStream | None, dtype: torch.dtype,
                   device: torch.device | str | None, batch_dim: int) -> torch.Tensor:
    """``torch.rand(shape)`` from ``generator``, per datapoint as :func:`random_normal`."""
    if isinstance(generator, DatapointStreams):
        return generator.uniform(shape, batch_dim=batch_dim, dtype=dtype)
    return torch.rand(shape, generator=generator, dtype=dtype, device=device)


def fork_seed(generator: RandomStream | None) -> int:
    """Draw a 62-bit seed from ``generator``, for code that can only use torch's global stream."""
    if isinstance(generator, DatapointStreams):
        return generator.fork_seed()
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())
