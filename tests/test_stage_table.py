"""The stage table (gapbench.runner.stage_table): its entries agree with each other, and the stage hashes
that finished folders are keyed by stay exactly what they were."""

import json
from pathlib import Path

import pytest

from gapbench.runner.build import stage_seed
from gapbench.runner.config import load_config
from gapbench.runner.migrate import comparable_config
from gapbench.runner.stage_table import (PER_DATAPOINT, STAGE_OF, STAGE_TABLE, STAGES, affected_stages, section_hash,
                                        stages_read)

ROOT = Path(__file__).resolve().parents[1]
CI_QUICK = ROOT / "experiments" / "ci_quick.toml"

# sha256 of each stage's hashed config sections, as recorded in run folders' stages.json: a change here
# makes every finished folder redo its stages (and retrain)
CI_QUICK_HASHES = {
    "train": "6db058bfe8ded8e029dcbb1cda85095d7bdb049ab63b0224ce32de13b33248e3",
    "amortized": "52e0a2c916eb9add920232bc349147354c0fbf74aa2f0ebe473ba2f9ee6e2774",
    "local": "86ed2e3edd40a9d43fe8f7d05a30fd14814b2481fdfaab639df9148e9c57f9d1",
    "ais": "bf22517c10d8d5a67419e559be9e0507613f03d9c5ef9508279f940cf222b8b1",
    "calibration": "96bafd69d704273931c2ba8d354706b8261b490d24f8a9f7a756c770436b78bc",
    "log_px": "bf22517c10d8d5a67419e559be9e0507613f03d9c5ef9508279f940cf222b8b1",
    "curve": "86ed2e3edd40a9d43fe8f7d05a30fd14814b2481fdfaab639df9148e9c57f9d1",
    "report": "3f9361a8bba05289fe7c0da1201d1c7e5e01b2884f5acddbf74d949c0a9beceb",
}
# the same with the keys that are hashed only when used: curve, calibration, semi-amortized, a health threshold
CI_QUICK_ALL_KEYS = ["curve.enabled=true", "ais.calibration_datapoints=3", "train.semi_amortized_steps=2",
                     "ais.flag_ess_fraction=0.3"]
CI_QUICK_ALL_KEYS_HASHES = {
    "train": "3530439d19e45494479921b0fd62250fdc985fd5c4fbd7eeae19d677f185d991",
    "amortized": "006c3c5ee632e2a9f1ed8660f329779b26113c419fd7e1eac350af462367538e",
    "local": "9bbf490ff87cc96555282b42870a03497f37400f4456448b7c13eca1a770cef2",
    "ais": "9ede75e45491b7ce20e84986f85ddef65ca478a7a08ef22cd0a85517fe2b12a0",
    "calibration": "aa942f7fdffdbf8f82ee8cd86f1feb56e8e0d8315425330e425312739c82b6e5",
    "log_px": "7817245cb76e153dd98d5bc316c9b18b87097e63eea24950e0f40d94bfe66b49",
    "curve": "aa389f843d769b77b2049456ce95b25de40de33dda29ad4a39ca4524ee1f4eed",
    "report": "018a04958b34acff5d61ca9f11802c1f57c9cc24ec444acbe572f6e4d474bd9e",
}
# the config_sha256 inside the committed training states (results/reproduction/fashion_mnist_full)
TRAINING_STATES = {"ffg": "d8f391cddb6e29eb2953990d019ef017b14b3fef61fa0abdf207c8dbfb23ded1",
                   "flow": "ffd45d0937faf2c4682346e0b827f9b625e9488526e1fec8e298daf1b6a7066f"}


def test_ci_quick_stage_hashes_are_pinned():
    resolved = load_config(CI_QUICK).model_dump(mode="json")
    assert {stage: section_hash(resolved, stage) for stage in STAGES} == CI_QUICK_HASHES
    resolved = load_config(CI_QUICK, CI_QUICK_ALL_KEYS).model_dump(mode="json")
    assert {stage: section_hash(resolved, stage) for stage in STAGES} == CI_QUICK_ALL_KEYS_HASHES


@pytest.mark.parametrize("family", sorted(TRAINING_STATES))
def test_the_committed_training_states_still_belong_to_their_folders(family):
    recorded = json.loads((ROOT / "results" / "reproduction" / "fashion_mnist_full" / family / "config.json").read_text())
    current = load_config(ROOT / "results" / "reproduction" / "fashion_mnist_full" / family / "config.json",
                          ignore_unknown=True).model_dump(mode="json")
    assert section_hash(comparable_config(recorded, current), "train") == TRAINING_STATES[family]


def test_ais_reads_the_local_stage_only_from_q_star():
    assert stages_read("ais", {"ais": {"init": "q_star"}}) == ("train", "local")
    for init in ("prior", "encoder"):
        assert stages_read("ais", {"ais": {"init": init}}) == ("train",)
    assert stages_read("log_px", {"ais": {"init": "prior"}}) == STAGE_OF["log_px"].reads


def test_the_table_is_consistent():
    for position, stage in enumerate(STAGE_TABLE):
        assert set(stage.reads) <= set(STAGES[:position]), f"{stage.name} reads a stage that runs after it"
        assert set(stage.per_datapoint) <= set(stage.outputs), stage.name
    assert len({stage.stream for stage in STAGE_TABLE}) == len(STAGE_TABLE)  # independent random streams
    assert "datapoints.csv" in PER_DATAPOINT and "curve.csv" not in PER_DATAPOINT  # curve: per step too
    outputs = [name for stage in STAGE_TABLE for name in stage.outputs]
    assert len(outputs) == len(set(outputs))  # every file has one stage


def test_stage_streams_keep_their_numbers():
    """A stage's stream number feeds every random draw of it: the numbers the results were made with."""
    assert {stage.name: stage.stream for stage in STAGE_TABLE} == {
        "train": 1, "amortized": 2, "local": 3, "report": 4, "ais": 5, "curve": 6, "log_px": 7, "calibration": 8}
    assert stage_seed(0, "amortized") != stage_seed(0, "local")


def test_what_a_stage_runs_for_and_reads():
    config = load_config(CI_QUICK)
    assert [s for s in STAGES if STAGE_OF[s].is_enabled(config)] == ["train", "amortized", "local", "ais",
                                                                      "log_px", "report"]
    with_all = load_config(CI_QUICK, CI_QUICK_ALL_KEYS)
    assert all(STAGE_OF[s].is_enabled(with_all) for s in STAGES)
    assert STAGE_OF["ais"].read_files(config) == ("checkpoint.pt",)
    assert STAGE_OF["ais"].read_files(load_config(CI_QUICK, ["ais.init=q_star"])) == ("checkpoint.pt", "local.pt")
    assert STAGE_OF["log_px"].read_files(load_config(CI_QUICK, ["ais.enabled=false"]))[-1] == "local.pt"


def test_a_change_redoes_its_stages_and_their_readers():
    assert affected_stages({"eval.num_samples"}) == ["amortized", "local", "ais", "log_px", "curve", "report"]
    assert affected_stages({"curve.steps"}) == ["curve", "report"]
    assert affected_stages({"ais.flag_ess_fraction"}) == ["report"]
    assert affected_stages({"train.epochs"}) == list(STAGES)


def test_where_local_flows_start_redoes_local_and_its_readers_only():
    """refine.flow_init changes the local stage's numbers and those of the stages reading q*; AIS from the
    encoder reads neither, so its finished chains are kept (AIS from q* is redone)."""
    previous = load_config(CI_QUICK, ['refine.families=["ffg", "flow"]']).model_dump(mode="json")
    resolved = load_config(CI_QUICK, ['refine.families=["ffg", "flow"]', 'refine.flow_init="q_star_ffg"']
                           ).model_dump(mode="json")
    assert resolved["ais"]["init"] == "encoder"
    assert affected_stages({"refine.flow_init"}, previous, resolved) == ["local", "log_px", "curve", "report"]
    from_q_star = [{**config, "ais": {**config["ais"], "init": "q_star"}} for config in (previous, resolved)]
    assert affected_stages({"refine.flow_init"}, *from_q_star) == ["local", "ais", "log_px", "curve", "report"]
