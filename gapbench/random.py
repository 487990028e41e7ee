"""Per-datapoint random streams: a datapoint's noise depends on the seed and its index only.

One ``torch.Generator`` consumed batch by batch gives a datapoint numbers that depend on which other
datapoints share its batch, shard or rank. :class:`DatapointStreams` gives every datapoint b its own
counter-based stream instead: the n-th 64-bit word of stream b is

    h(b, n) = mix64(key_b + (n + 1) * GAMMA)

with ``mix64`` the SplitMix64 output function (Steele, Lea & Flood, 2014, "Fast splittable
pseudorandom number generators"; constants of Vigna's splitmix64.c) and key_b itself a SplitMix64
word of the stream seed at the datapoint's index. Every word is a pure function of (key, counter),
so a whole (K, B, ...) block of noise is computed at once with integer tensor operations, on any
device, with no loop over datapoints; only the counters (B,) are state. A draw of K samples of P
values advances datapoint b's counter by K * ceil(P / 2) (normal: one word gives two values by the
Box-Muller transform) or K * P (uniform), so drawing K1 + K2 samples equals drawing K1 then K2.

Cost: on one CPU thread these normals take about twice as long as ``torch.randn`` (int64 hashing is
not vectorised as well as the Mersenne Twister); ``gapbench bench scale`` measures what that costs
IWAE and refinement end to end.
Normals come from 24-bit uniforms in float32 (|z| <= 5.8) and 32-bit ones in float64 (|z| <= 6.7).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def _signed(value: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= (1 << 63) else value


GAMMA = _signed(0x9E3779B97F4A7C15)  # the golden-ratio increment of SplitMix64
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic on signed integers)."""
    shifted = x >> n
    shifted &= (1 << (64 - n)) - 1
    return shifted


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on int64 tensors (wrap-around multiplication); overwrites ``x``."""
    for shift, factor in ((30, _MIX1), (27, _MIX2), (31, None)):
        x ^= _shift_right(x, shift)
        if factor is not None:
            x *= factor
    return x


def _uniform_bits(words: torch.Tensor, dtype: torch.dtype, high: bool) -> torch.Tensor:
    """Uniforms in (0, 1) from the high or low half of each word: 24 bits for float32/16, 32 for float64."""
    bits = 32 if dtype == torch.float64 else 24
    part = _shift_right(words, 64 - bits) if high else words & ((1 << bits) - 1)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return part.to(work).add_(0.5).mul_(2.0 ** -bits)


class DatapointStreams:
    """Independent random streams for B datapoints, usable wherever a ``generator`` is taken.

    ``select(positions)`` gives the streams of a subset of the datapoints; they share counters with
    this object, so a subset's draws advance the full set's streams (refinement drops datapoints
    that have stopped). ``get_state``/``set_state`` save and replay the counters, as for a Generator.

    Parameters
    ----------
    keys : (B,) int64, one key per datapoint
    counters : (N,) int64 counters shared by every view; None: zeros of shape (B,)
    rows : (B,) positions of these datapoints in ``counters``; None: 0..B-1
    """

    def __init__(self, keys: torch.Tensor, counters: torch.Tensor | None = None, rows: torch.Tensor | None = None):
        self.keys = keys
        self.counters = torch.zeros_like(keys) if counters is None else counters
        self.rows = torch.arange(keys.shape[0], device=keys.device) if rows is None else rows

    @classmethod
    def from_seed(cls, seed: int, indices: Sequence[int] | torch.Tensor | np.ndarray, *,
                  device: torch.device | str | None = None) -> "DatapointStreams":
        """Streams for the datapoints with these global ``indices``, from a 64-bit ``seed``: the same
        (seed, index) gives the same stream whatever else is in the batch."""
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64), device=device)  # (B,)
        keys = mix64((index + 1) * GAMMA + _signed(seed % (1 << 64)))  # (B,)
        return cls(keys)

    @property
    def num_datapoints(self) -> int:
        return int(self.keys.shape[0])

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def select(self, positions: torch.Tensor) -> "DatapointStreams":
        """The streams of ``positions`` (indices or a boolean mask into these B datapoints)."""
        positions = positions.to(self.keys.device)
        return DatapointStreams(self.keys[positions], self.counters, self.rows[positions])

    def get_state(self) -> torch.Tensor:
        return self.counters[self.rows].clone()

    def set_state(self, state: torch.Tensor) -> None:
        self.counters[self.rows] = state

    def _words(self, num_lead: int, per_datapoint: int) -> torch.Tensor:
        """The next num_lead * per_datapoint words of each stream, as (num_lead, B, per_datapoint)."""
        counters = self.counters[self.rows]  # (B,)
        self.counters[self.rows] = counters + num_lead * per_datapoint
        start = self.keys + (counters + 1) * GAMMA  # (B,) the state before the first word
        steps = torch.arange(num_lead * per_datapoint, dtype=torch.int64, device=self.keys.device) * GAMMA
        return mix64(start.view(1, -1, 1) + steps.view(num_lead, 1, per_datapoint))  # (L, B, W)

    def _layout(self, shape: Sequence[int], batch_dim: int) -> tuple[int, int]:
        shape = tuple(shape)
        if not 0 <= batch_dim < len(shape) or shape[batch_dim] != self.num_datapoints:
            raise ValueError(f"per-datapoint streams hold {self.num_datapoints} datapoints, but the draw of shape "
                             f"{shape} has {shape[batch_dim] if 0 <= batch_dim < len(shape) else '?'} along "
                             f"dimension {batch_dim}; select the streams of the batch's datapoints")
        return math.prod(shape[:batch_dim]), math.prod(shape[batch_dim + 1:])

    def normal(self, shape: Sequence[int], *, batch_dim: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """N(0, 1) values of ``shape``, datapoints along ``batch_dim`` (Box-Muller, two values a word)."""
        num_lead, per_datapoint = self._layout(shape, batch_dim)
        num_words = -(-per_datapoint // 2)
        words = self._words(num_lead, num_words)  # (L, B, W)
        radius = _uniform_bits(words, dtype, high=True).log_().mul_(-2.0).sqrt_()  # (L, B, W)
        angle = _uniform_bits(words, dtype, high=False).mul_(2.0 * math.pi)  # (L, B, W)
        # word w gives value w (r cos) and value W + w (r sin): two blocks, cheaper than interleaving
        pairs = torch.cat([torch.cos(angle).mul_(radius), torch.sin(angle).mul_(radius)], -1)  # (L, B, 2W)
        values = pairs[..., :per_datapoint]  # (L, B, P)
        return values.to(dtype).reshape(tuple(shape))

    def uniform(self, shape: Sequence[int], *, batch_dim: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """U(0, 1) values of ``shape``, datapoints along ``batch_dim`` (one word each)."""
        num_lead, per_datapoint = self._layout(shape, batch_dim)
        words = self._words(num_lead, per_datapoint)  # (L, B, P)
        return _uniform_bits(words, dtype, high=True).to(dtype).reshape(tuple(shape))

    def fork(self) -> "DatapointStreams":
        """New streams for the same datapoints, independent of these: each keyed by its datapoint's
        next word (these streams advance by one word). Per datapoint, unlike :meth:`fork_seed`."""
        words = self._words(1, 1).view(-1)  # (B,)
        return DatapointStreams(mix64(words + GAMMA))

    def fork_seed(self) -> int:
        """One 62-bit seed from all these streams (for code that can only use torch's global stream):
        it depends on every datapoint of the batch, so it is not per-datapoint."""
        words = self._words(1, 1).flatten()  # (B,)
        seed = mix64(words.sum().view(1) + GAMMA)  # (1,)
        return int(_shift_right(seed, 2).item())
