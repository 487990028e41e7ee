"""The faster training loop keeps Adam's update and its saved state; `gapbench bench train` counts right."""

import json
from pathlib import Path

import pytest
import torch

from gapbench.cli import main
from gapbench.bench.train import step_flops
from gapbench.data import load_dataset
from gapbench.models import Decoder
from gapbench.posteriors import GaussianEncoder
from gapbench.train import ADAM_IMPLEMENTATIONS, _restore, make_adam, train

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


@pytest.mark.parametrize("implementation", ADAM_IMPLEMENTATIONS)
def test_every_implementation_takes_adams_step(implementation):
    """Two steps against the closed form of Kingma & Ba (2015), Algorithm 1."""
    lr, eps, (b1, b2) = 0.1, 1e-4, (0.9, 0.999)
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    grads = [torch.tensor([0.3, -0.1, 2.0]), torch.tensor([-0.2, 0.4, 1.0])]
    optimizer = make_adam([param], learning_rate=lr, eps=eps, implementation=implementation)
    expected, m, v = param.detach().double().clone(), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        param.grad = g.clone()
        optimizer.step()
        m, v = b1 * m + (1 - b1) * g.double(), b2 * v + (1 - b2) * g.double() ** 2
        expected -= lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    torch.testing.assert_close(param.detach().double(), expected, rtol=1e-6, atol=1e-7)


def _train(adam: str, *, epochs: int, resume_from=None):
    data = load_dataset("digits")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        decoder, encoder = Decoder(64, 4, (32,)), GaussianEncoder(64, 4, (32,))
    saved = []
    result = train(decoder, encoder, data.train[:300], data.valid[:100], epochs=epochs, batch_size=50,
                   learning_rate=3e-3, adam_eps=1e-8, warmup_epochs=1, schedule="constant", binarization="dynamic",
                   threshold=0.5, valid_every=1, valid_num_samples=5, early_stopping_patience=0,
                   generator=torch.Generator().manual_seed(1), resume_from=resume_from,
                   on_checkpoint=saved.append, progress=False, adam=adam)
    return result, saved, (decoder, encoder)


def test_a_state_saved_by_torchs_default_adam_continues_under_the_fused_one():
    """train_state.pt of a training begun before this change (torch's for-loop Adam) loads, keeps the
    fused implementation, and ends where the old loop would, up to rounding."""
    whole, snapshots, _ = _train("for-loop", epochs=3)
    resumed, _, (decoder, encoder) = _train("fused", epochs=3, resume_from=snapshots[0])
    assert [r.epoch for r in resumed.history] == [1, 2, 3]
    for key, value in whole.decoder_state.items():
        torch.testing.assert_close(resumed.decoder_state[key], value, rtol=1e-3, atol=1e-4)
    optimizer = make_adam(list(decoder.parameters()) + list(encoder.parameters()), learning_rate=1.0, eps=1.0)
    _restore(snapshots[0], decoder, encoder, optimizer, torch.Generator())
    assert optimizer.param_groups[0]["fused"] is True and optimizer.param_groups[0]["lr"] == 3e-3
    assert optimizer.state_dict()["state"][0]["exp_avg"].shape == snapshots[0]["optimizer"]["state"][0]["exp_avg"].shape


def test_flops_of_a_step():
    # layers 4 -> 3 (input: the data, no input gradient) and 3 -> 2, batch 10:
    # forward 2 (12 + 6) = 36, backward 2 * 12 (weights) + 2 * 2 * 6 (weights and input) = 48, per datapoint
    assert step_flops([(4, 3, False), (3, 2, True)], 10) == 10 * (36 + 48)


def test_bench_train_prints_seconds_per_epoch_and_share_of_matmul_peak(tmp_path, capsys):
    out = tmp_path / "figures.json"
    assert main(["bench", "train", str(ROOT / "experiments" / "ci_quick.toml"), "--num-train", "200", "--rounds", "1",
                 "--adam", "for-loop", "fused", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "share of matmul peak" in printed and "fused" in printed
    figures = json.loads(out.read_text())
    assert set(figures["seconds_per_epoch"]) == {"for-loop", "fused"}
    assert figures["layers"][0] == [64, 64, False]  # digits: 8 x 8 pixels into the first encoder layer
    assert 0 < figures["share_of_matmul_peak"]["fused"] < 1.5
