"""Standard-normal noise whose values do not depend on how the samples are chunked."""

from __future__ import annotations

import math

import torch

# torch's CPU float32 normal sampler fills blocks of 16 values; a draw whose size is not a multiple
# of 16 redraws its tail, so two consecutive draws differ from one draw of the combined size. Padding
# each sample's slice to a multiple of 16 keeps every draw aligned, so K samples drawn at once equal
# the same K samples drawn in consecutive chunks (checked in tests/test_posteriors.py).
_BLOCK = 16


def standard_normal(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw N(0, I) noise of ``shape = (K, *rest)``, consistent under chunking along K.

    Drawing ``(K1 + K2, *rest)`` gives the same numbers as drawing ``(K1, *rest)`` then
    ``(K2, *rest)`` from the same generator (on CPU), so chunked and unchunked estimators agree.

    Parameters
    ----------
    shape : (K, *rest)
    generator : the random stream (keyword-only; ``None`` uses torch's global stream)

    Returns
    -------
    Tensor of shape ``shape``.
    """
    num_samples, rest = shape[0], tuple(shape[1:])
    per_sample = math.prod(rest)
    padded = -(-per_sample // _BLOCK) * _BLOCK  # round up to a multiple of the block
    noise = torch.randn(num_samples, padded, generator=generator, dtype=dtype, device=device)  # (K, P)
    if padded != per_sample:
        noise = noise[:, :per_sample]  # (K, prod(rest))
    return noise.reshape(num_samples, *rest)  # (K, *rest)


def fork_seed(generator: torch.Generator | None) -> int:
    """Draw a 62-bit seed from ``generator``, for code that can only use torch's global stream."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())
