"""Sharded evaluation: a 2-process gloo job under torchrun writes the files of a 1-process run; --device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gapbench.cli import main
from gapbench.runner.config import ConfigError
from gapbench.runner.device import resolve_device, rows_that_fit, samples_per_chunk
from gapbench.runner.distributed import Ranks, shard

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "experiments" / "digits.toml"
QUICK = ["--set", "train.epochs=3", "--set", "train.warmup_epochs=1", "--set", "eval.num_datapoints=23",
         "--set", "eval.num_samples=200", "--set", "refine.max_steps=100", "--set", "ais.num_steps=20",
         "--set", "ais.num_chains=4", "--set", "ais.init=\"q_star\"", "--quiet"]
PER_DATAPOINT = ("amortized.csv", "local.csv", "ais.csv", "curve.csv", "datapoints.csv")
# two local families (each with its own streams) and the curve stage, sharded like the other stages
FAMILIES_AND_CURVE = ["--set", 'refine.families=["ffg","planar"]', "--set", "curve.enabled=true",
                      "--set", "curve.steps=[0,1,5]", "--set", "curve.eval_samples=50"]


@pytest.mark.parametrize("num_datapoints, world_size", [(23, 2), (10, 3), (2, 4), (1000, 7)])
def test_shards_cover_the_datapoints_in_order(num_datapoints, world_size):
    shards = [shard(num_datapoints, Ranks(r, world_size)) for r in range(world_size)]
    assert [i for s in shards for i in s] == list(range(num_datapoints))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_device_selection_without_a_gpu():
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
        return
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu")
    assert rows_that_fit(torch.device("cpu"), 1000) is None  # the CPU keeps the estimators' defaults
    assert samples_per_chunk(None, 100) is None and samples_per_chunk(10_000, 300) == 33


def test_cli_refuses_cuda_without_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["run", str(DIGITS), "--out", str(tmp_path / "run"), "--device", "cuda", *QUICK]) == 2
    error = capsys.readouterr().err
    assert "--device cuda" in error and "--device cpu" in error
    assert not (tmp_path / "run").exists()


def _torchrun(out: Path, num_processes: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_processes}",
               "-m", "gapbench", "run", str(DIGITS), "--out", str(out), *QUICK, *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)


def _numbers(obj, path=""):
    """Flatten a JSON object to {path: leaf}."""
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _numbers(value, f"{path}.{key}").items()}
    if isinstance(obj, list):  # e.g. the curve's values per step count
        return {k: v for i, value in enumerate(obj) for k, v in _numbers(value, f"{path}[{i}]").items()}
    return {path: obj}


@pytest.mark.slow  # two full runs, one under torchrun with 2 processes (137 s on a loaded 2-core machine)
def test_two_ranks_write_the_files_of_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["run", str(DIGITS), "--out", str(one), *QUICK, *FAMILIES_AND_CURVE]) == 0
    result = _torchrun(two, 2, *FAMILIES_AND_CURVE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("| L[q] |") == 1  # rank 0 alone prints the table
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for name in PER_DATAPOINT:
        a, b = pd.read_csv(one / name), pd.read_csv(two / name)
        rows = 23 * 3 if name == "curve.csv" else 23  # the curve: a row per datapoint and step count
        assert list(a.columns) == list(b.columns) and len(a) == len(b) == rows, name
        numeric = a.select_dtypes("number").columns
        # equal up to float32 rounding (BLAS sums a row differently for another number of rows)
        np.testing.assert_allclose(b[numeric].to_numpy(), a[numeric].to_numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
        for column in a.columns.difference(numeric):
            assert (a[column] == b[column]).all(), (name, column)
        for column in (c for c in a.columns if c.startswith("refine_steps")):
            assert (a[column] == b[column]).all(), (name, column)
    q_one, q_two = (torch.load(d / "local.pt", weights_only=True) for d in (one, two))
    assert q_one.keys() == q_two.keys() == {"ffg", "planar"}
    for family in q_one:
        assert q_one[family].keys() == q_two[family].keys()
        for key in q_one[family]:
            assert torch.allclose(q_one[family][key], q_two[family][key], rtol=1e-5, atol=1e-5), (family, key)
    s_one, s_two = (_numbers(json.loads((d / "summary.json").read_text())) for d in (one, two))
    assert s_one.keys() == s_two.keys()
    for key, value in s_one.items():
        if isinstance(value, float):
            assert value == pytest.approx(s_two[key], rel=1e-5, abs=1e-6), key
        else:
            assert value == s_two[key], key
    assert json.loads((two / "stages.json").read_text()).keys() == json.loads((one / "stages.json").read_text()).keys()
    # a rerun of the 2-process job skips every stage and changes nothing
    before = (two / "datapoints.csv").read_bytes()
    again = _torchrun(two, 2, *FAMILIES_AND_CURVE)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[ais] skipped" in again.stderr and "[curve] skipped" in again.stderr
    assert (two / "datapoints.csv").read_bytes() == before
    # rank 0's refusal of a folder with another config stops every rank with its message
    refused = _torchrun(two, 2, *FAMILIES_AND_CURVE, "--set", "eval.num_samples=100")
    assert refused.returncode != 0
    assert "holds a run with a different config" in refused.stderr
    assert "rank 0 could not open the run folder" in refused.stderr
    assert (two / "datapoints.csv").read_bytes() == before


@pytest.mark.slow  # torchrun with 2 processes that both train (49 s on a loaded 2-core machine)
def test_data_parallel_training_keeps_the_ranks_in_step(tmp_path):
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    result = _torchrun(ddp, 2, "--set", "train.data_parallel=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(pd.read_csv(ddp / "train_history.csv")) == 3
    # Rank 1 evaluated its shard with its own DDP-trained weights; one process evaluating everything
    # with rank 0's checkpoint gets the same rows only if the two ranks' weights stayed equal.
    one.mkdir()
    for name in ("config.json", "checkpoint.pt", "train_history.csv"):
        (one / name).write_bytes((ddp / name).read_bytes())
    stages = json.loads((ddp / "stages.json").read_text())
    (one / "stages.json").write_text(json.dumps({"train": stages["train"]}))
    assert main(["run", str(DIGITS), "--out", str(one), *QUICK, "--set", "train.data_parallel=true"]) == 0
    a, b = pd.read_csv(one / "datapoints.csv"), pd.read_csv(ddp / "datapoints.csv")
    numeric = a.select_dtypes("number").columns
    np.testing.assert_allclose(b[numeric].to_numpy(), a[numeric].to_numpy(), rtol=1e-5, atol=1e-5)
    assert (a["refine_steps"] == b["refine_steps"]).all()


def test_data_parallel_off_keeps_older_stage_records():
    from gapbench.runner.config import parse_config
    from gapbench.runner.rundir import section_hash

    resolved = parse_config({"name": "x"}).model_dump(mode="json")
    older = json.loads(json.dumps(resolved))
    del older["train"]["data_parallel"]  # a config from before the key
    assert section_hash(resolved, "train") == section_hash(older, "train")
    resolved["train"]["data_parallel"] = True
    assert section_hash(resolved, "train") != section_hash(older, "train")
    # one rule with main's: a config from before both data_parallel and the semi_amortized_* keys
    oldest = {k: v for k, v in older["train"].items() if not k.startswith("semi_amortized_")}
    resolved["train"]["data_parallel"] = False
    assert section_hash(resolved, "train") == section_hash({**older, "train": oldest}, "train")


def test_data_parallel_refuses_semi_amortized_training(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(DIGITS), "--out", str(out), *QUICK, "--set", "train.data_parallel=true",
                 "--set", "train.semi_amortized_steps=2"]) == 2
    error = capsys.readouterr().err
    assert "train.data_parallel" in error and "semi_amortized_steps" in error
    assert not out.exists()


@pytest.mark.slow
def test_two_ranks_stop_at_the_time_limit_together_and_resume(tmp_path):
    """Slow (about ten torchrun jobs: 3 min on 2 busy cores): with a limit shorter than start-up every job
    does one unit and stops; rank 0 decides, both ranks stop after the same round, and the stretches
    end with the files of a job that was never stopped."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    batches = ["--set", "eval.batch_size=6"]  # two units per rank and stage
    assert _torchrun(whole, 2, *batches).returncode == 0
    os.environ["GAPBENCH_TIME_LIMIT"] = "0.001s"
    try:
        results = []
        while not results or results[-1].returncode != 0:
            results.append(_torchrun(cut, 2, *batches))
            assert len(results) < 20, results[-1].stderr[-3000:]
    finally:
        del os.environ["GAPBENCH_TIME_LIMIT"]
    stopped = [r for r in results if "stopped at the time limit" in r.stderr]
    assert len(stopped) == len(results) - 1 >= 5
    for result in stopped:
        assert result.returncode != 0  # torchrun reports a rank's exit code 3 as its own failure
        assert result.stderr.count("Run the same command again to continue") == 2, result.stderr[-3000:]
    assert not (cut / "partial").exists()
    for name in (*PER_DATAPOINT[:3], "datapoints.csv", "local.pt"):
        assert (cut / name).read_bytes() == (whole / name).read_bytes(), name
