"""Training: schedules, warm-up, determinism and that it learns."""

import pytest
import torch

from gapbench.data import load_dataset
from gapbench.models import Decoder
from gapbench.posteriors import GaussianEncoder
from gapbench.train import paper_learning_rate, train, warmup_weight


def test_paper_schedule_stages():
    base = 1e-3
    # stage i lasts 3^i epochs: epoch 0 | 1-3 | 4-12 | 13-39 | ...
    assert paper_learning_rate(0, base) == pytest.approx(base)
    for epoch in (1, 3):
        assert paper_learning_rate(epoch, base) == pytest.approx(base * 10 ** (-1 / 7))
    for epoch in (4, 12):
        assert paper_learning_rate(epoch, base) == pytest.approx(base * 10 ** (-2 / 7))
    assert paper_learning_rate(13, base) == pytest.approx(base * 10 ** (-3 / 7))
    assert paper_learning_rate(3279, base) == pytest.approx(base * 10 ** (-7 / 7))


def test_warmup_is_linear():
    assert warmup_weight(0, 100) == 0.0
    assert warmup_weight(50, 100) == 0.5
    assert warmup_weight(150, 100) == 1.0
    assert warmup_weight(3, 0) == 1.0


def _train(seed=0, epochs=4):
    data = load_dataset("digits")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        decoder, encoder = Decoder(64, 4, (32,)), GaussianEncoder(64, 4, (32,))
    records = []
    result = train(decoder, encoder, data.train, data.valid, epochs=epochs, batch_size=100,
                   learning_rate=3e-3, adam_eps=1e-8, warmup_epochs=1, schedule="constant",
                   binarization="dynamic", threshold=0.5, valid_every=1, valid_num_samples=5,
                   early_stopping_patience=0, generator=torch.Generator().manual_seed(seed),
                   on_epoch=lambda r, best: records.append((r, best)), progress=False)
    return result, records


def test_training_learns_and_keeps_the_best_epoch():
    result, records = _train(epochs=6)
    valid = [r.valid_elbo for r, _ in records]
    assert valid[-1] > valid[0] + 1.0  # the ELBO on held-out digits improves
    assert result.best_valid_elbo == max(valid)
    assert result.best_epoch == 1 + valid.index(max(valid))
    assert records[-1][0].beta == 1.0


def test_training_is_deterministic_on_cpu():
    a, _ = _train(seed=3, epochs=2)
    b, _ = _train(seed=3, epochs=2)
    for key, value in a.decoder_state.items():
        assert torch.equal(value, b.decoder_state[key])
    assert a.best_valid_elbo == b.best_valid_elbo
