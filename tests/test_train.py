"""Training: schedules, warm-up, determinism and that it learns."""

import io

import pytest
import torch

from gapbench.data import DataError, load_dataset
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


class Interrupted(Exception):
    pass


def test_resumed_training_ends_exactly_as_uninterrupted_training():
    data = load_dataset("digits")

    def run(resume_from=None, stop_after=None):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            decoder, encoder = Decoder(64, 4, (32,)), GaussianEncoder(64, 4, (32,))
        saved = []

        def on_epoch(record, is_best):
            if record.epoch == stop_after:
                raise Interrupted  # a crash after the snapshot of this epoch was taken

        def on_checkpoint(state):
            saved.append(state)

        result = train(decoder, encoder, data.train[:300], data.valid[:100], epochs=6, batch_size=50,
                       learning_rate=3e-3, adam_eps=1e-8, warmup_epochs=2, schedule="paper",
                       binarization="dynamic", threshold=0.5, valid_every=2, valid_num_samples=5,
                       early_stopping_patience=0, generator=torch.Generator().manual_seed(1),
                       on_epoch=on_epoch, resume_from=resume_from, on_checkpoint=on_checkpoint,
                       checkpoint_seconds=0, progress=False)
        return result, saved

    whole, snapshots = run()
    assert [s["epoch"] for s in snapshots] == [1, 2, 3, 4, 5, 6]
    # a snapshot survives torch.save / torch.load(weights_only=True), and resuming from it (here
    # from epoch 3, in the middle of the warm-up and between validation checks) changes nothing
    buffer = io.BytesIO()
    torch.save(snapshots[2], buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed, _ = run(resume_from=state)
    assert resumed.best_epoch == whole.best_epoch and resumed.best_valid_elbo == whole.best_valid_elbo
    for key, value in whole.decoder_state.items():
        assert torch.equal(value, resumed.decoder_state[key])
    assert [str(r[:5]) for r in resumed.history] == [str(r[:5]) for r in whole.history]  # not the seconds
    # a snapshot of a finished training resumes to the same result without another epoch
    done, more = run(resume_from=snapshots[-1])
    assert done.best_valid_elbo == whole.best_valid_elbo and more == []


def test_training_stops_when_it_diverges():
    data = load_dataset("digits")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        decoder, encoder = Decoder(64, 4, (32,)), GaussianEncoder(64, 4, (32,))
    epochs = []

    def on_epoch(record, is_best):
        epochs.append(record.epoch)
        if record.epoch == 2:
            with torch.no_grad():  # what an overflow does to the weights
                next(decoder.parameters()).fill_(torch.nan)

    result = train(decoder, encoder, data.train[:200], data.valid[:50], epochs=10, batch_size=100,
                   learning_rate=1e-3, adam_eps=1e-8, warmup_epochs=0, schedule="constant",
                   binarization="static", threshold=0.5, valid_every=1, valid_num_samples=2,
                   early_stopping_patience=0, generator=torch.Generator().manual_seed(0), on_epoch=on_epoch,
                   progress=False)
    assert result.stop_reason == "diverged" and epochs == [1, 2, 3]
    assert result.best_epoch in (1, 2) and all(torch.isfinite(v).all() for v in result.decoder_state.values())


def test_training_refuses_data_outside_0_1():
    data = load_dataset("digits")
    decoder, encoder = Decoder(64, 4, (32,)), GaussianEncoder(64, 4, (32,))
    with pytest.raises(DataError, match=r"training data: values span \[0, 16\]"):
        train(decoder, encoder, data.train * 16, data.valid, epochs=1, batch_size=100, learning_rate=1e-3,
              adam_eps=1e-8, warmup_epochs=0, schedule="constant", binarization="dynamic", threshold=0.5,
              valid_every=1, valid_num_samples=2, early_stopping_patience=0,
              generator=torch.Generator().manual_seed(0), progress=False)
