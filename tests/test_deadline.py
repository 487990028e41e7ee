"""The time limit's parts: durations, the stop rule on an injected clock, SIGTERM, partial files."""

import os
import signal

import pandas as pd
import pytest
import torch

from gapbench.deadline import Deadline, format_duration, parse_duration
from gapbench.runner.partial import PartialStore, Unit, UnitResult, run_units, units_of
from gapbench.runner.distributed import ONE_PROCESS


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("45m", 2700), ("2h30m", 9000), ("1h5m10s", 3910),
                                           ("1.5h", 5400), ("12", 12), ("0.25s", 0.25), (" 2H ", 7200)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "5x", "-3s", "0s", "1m2h", "nan", "inf"])
def test_bad_durations_name_the_form(text):
    with pytest.raises(ValueError, match="90s, 45m or 2h30m"):
        parse_duration(text)


def test_format_duration():
    assert [format_duration(s) for s in (9000, 2710, 12.5)] == ["2h30m", "45m10s", "12.5s"]


class Ticks:
    """A clock that reads the seconds it is set to."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_stops_when_one_more_unit_would_pass_the_limit():
    clock = Ticks()
    deadline = Deadline(100, clock=clock, margin=5)
    deadline.begin()
    clock.now = 30
    deadline.progressed()
    assert not deadline.should_stop()  # 30 + 30 + 5 < 100
    clock.now = 55
    assert not deadline.should_stop()  # 55 + 25 + 5 < 100
    clock.now = 80
    assert deadline.should_stop()  # 80 + 25 + 5 >= 100: the next unit would end after 95
    assert not deadline.is_expired()
    clock.now = 95
    assert deadline.is_expired()


def test_nothing_stops_before_the_first_unit_or_without_a_limit():
    clock = Ticks()
    deadline = Deadline(10, clock=clock)
    clock.now = 50  # start-up took longer than the limit: one unit still runs
    assert not deadline.should_stop() and not deadline.is_expired()
    deadline.progressed()
    assert deadline.should_stop() and deadline.is_expired()
    unlimited = Deadline(clock=clock)
    unlimited.progressed()
    clock.now = 1e9
    assert not unlimited.should_stop() and not unlimited.is_expired()


def test_the_default_margin_is_small():
    assert Deadline(10).margin == pytest.approx(0.2)
    assert Deadline(9000).margin == 30


def test_sigterm_sets_the_flag_and_the_old_handler_returns():
    deadline = Deadline()
    before = signal.getsignal(signal.SIGTERM)
    with deadline.handling_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        assert deadline.is_terminated and deadline.should_stop() and deadline.is_expired()
    assert signal.getsignal(signal.SIGTERM) == before
    assert "SIGTERM" in deadline.reason()


def result(unit: Unit) -> UnitResult:
    frame = pd.DataFrame({"value": torch.arange(unit.start, unit.stop, dtype=torch.float64).numpy() / 3,
                          "flag": [True] * unit.size})
    return UnitResult(frame, {"mean": torch.randn(unit.size, 2, generator=torch.Generator().manual_seed(unit.start))})


def test_a_partial_file_is_used_only_for_its_key_and_range(tmp_path):
    store = PartialStore(tmp_path, "amortized", "key-a")
    unit = Unit(10, 14)
    store.save(unit, result(unit))
    loaded = store.load(unit)
    pd.testing.assert_frame_equal(loaded.frame, result(unit).frame)
    assert torch.equal(loaded.tensors["mean"], result(unit).tensors["mean"])
    assert PartialStore(tmp_path, "amortized", "key-b").load(unit) is None  # another config or other weights
    assert store.load(unit) is None  # and the stale file is gone
    store.save(unit, result(unit))
    path = next(store.dir.iterdir())
    path.write_bytes(path.read_bytes()[:100])  # damaged
    assert store.load(unit) is None and not path.exists()
    with pytest.raises(ValueError):
        store.save(Unit(0, 3), result(unit))  # rows of other datapoints


def test_units_resume_from_the_saved_ones_and_stop_between_units(tmp_path):
    plan = [units_of([range(0, 10), range(10, 17)], 4)]
    assert plan[0] == [Unit(0, 4), Unit(4, 8), Unit(8, 10), Unit(10, 14), Unit(14, 17)]
    store = PartialStore(tmp_path, "ais", "key")
    computed = []

    def compute(unit):
        computed.append(unit)
        return result(unit)
    answers = iter([False, False, True])
    with pytest.raises(Exception, match=r"\[ais\] 8 of 17 datapoints done, 9 remain"):
        run_units(plan, compute, store=store, ranks=ONE_PROCESS, should_stop=lambda: next(answers), what="ais")
    assert computed == plan[0][:2]
    computed.clear()
    results = run_units(plan, compute, store=store, ranks=ONE_PROCESS, should_stop=lambda: False, what="ais")
    assert computed == plan[0][2:]
    whole = pd.concat([r.frame for r in results], ignore_index=True)
    pd.testing.assert_frame_equal(whole, pd.concat([result(u).frame for u in plan[0]], ignore_index=True))
