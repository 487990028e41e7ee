"""The benchmark commands run end to end on a tiny trained run and report consistent figures.

No timing is asserted (machines are shared and noisy); the figures themselves are checked for
internal consistency.
"""

import json

import pytest

from gapbench.bench.ais import bench_ais
from gapbench.bench.iwae import bench_iwae, decoder_flops_per_row
from gapbench.bench.refine import bench_refine
from gapbench.bench.refine_flow import bench_refine_flow
from gapbench.bench.scale import bench_scale
from gapbench.cli import main
from gapbench.models import ConvDecoder, Decoder

from test_cli import DIGITS, QUICK


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    assert main(["run", str(DIGITS), "--out", str(out), *QUICK]) == 0
    return out


def test_flop_count_of_paper_decoder():
    decoder = Decoder(784, 50, (200, 200))
    assert decoder_flops_per_row(decoder) == 2 * (50 * 200 + 200 * 200 + 200 * 784)


def test_flop_count_of_the_paper_conv_decoder():
    """z (50) -> 256 x 4 x 4 -> deconvolutions 256 -> 128 -> 64 -> 6 (means and log-scales), kernel 4:
    each input value of a deconvolution meets C_out * 16 weights."""
    decoder = ConvDecoder((3, 32, 32), 50, (64, 128, 256))
    expected = 2 * (50 * 256 * 16 + 256 * 16 * 128 * 16 + 128 * 64 * 64 * 16 + 64 * 256 * 6 * 16)
    assert decoder_flops_per_row(decoder) == expected


def test_bench_iwae_reports_figures(tiny_run):
    figures = bench_iwae(str(tiny_run), num_datapoints=20, num_samples=100, memory_ks=(10, 100),
                         memory_datapoints=5, log=lambda m: None)
    assert figures["seconds"] > 0 and figures["gflops"] > 0 and figures["matmul_gflops"] > 0
    assert figures["fraction_of_matmul"] == pytest.approx(figures["gflops"] / figures["matmul_gflops"])
    assert [m["k"] for m in figures["memory"]] == [10, 100]
    json.dumps(figures)


@pytest.mark.slow
def test_bench_refine_reports_figures(tiny_run):
    """Slow (141 s on a loaded 2-core machine): the paper's procedure, one datapoint at a time, runs
    its rule to the end (at least 1100 steps), which is what the benchmark times."""
    lines = []
    figures = bench_refine(str(tiny_run), num_datapoints=6, reference_datapoints=1, num_samples=200,
                           log=lines.append)
    r, g = figures["reference"], figures["gapbench"]
    assert r["mean_steps"] % 100 == 0 and r["mean_steps"] >= 1100  # the paper's rule
    assert figures["speedup"] == pytest.approx(r["seconds_per_datapoint"] * 6 / g["seconds"])
    assert figures["elbo_difference_subset"] == pytest.approx(
        g["mean_elbo_q_star_subset"] - r["mean_elbo_q_star_subset"])
    assert any("speed-up" in line for line in lines)
    json.dumps(figures)


def test_bench_ais_reports_figures(tiny_run):
    lines = []
    figures = bench_ais(str(tiny_run), num_datapoints=10, num_chains=3, num_steps=4, num_leapfrog=2,
                        memory_steps=20, memory_datapoints=5, matmul_size=256, log=lines.append)
    assert figures["num_transitions"] == 3 and figures["gradient_evaluations"] == 4 + 3 * 2
    assert figures["transitions_per_second"] == pytest.approx(10 * 3 * 3 / figures["seconds"])
    assert figures["fraction_of_matmul"] == pytest.approx(figures["gflops"] / figures["matmul_gflops"])
    assert [t for t, _ in figures["memory"]["rss_by_step_mib"]] == list(range(2, 21, 2))
    assert any("datapoint-chain-transitions/s" in line for line in lines)
    json.dumps(figures)


@pytest.mark.slow  # torchrun with 1 and 2 processes, each a full evaluation (59 s on a loaded 2-core machine)
def test_bench_scale_reports_figures(tiny_run):
    lines = []
    figures = bench_scale(str(tiny_run), num_datapoints=6, processes=(1, 2), overrides=("eval.num_samples=50",),
                          stream_datapoints=12, log=lines.append)
    one, two = figures["scaling"]
    assert (one["processes"], two["processes"]) == (1, 2) and one["scaling_efficiency"] == 1.0
    for row in (one, two):
        assert set(row["stage_seconds"]) == {"amortized", "local", "ais"}
        assert row["datapoints_per_second"] == pytest.approx(6 / sum(row["stage_seconds"].values()))
    assert two["scaling_efficiency"] == pytest.approx(two["datapoints_per_second"] / (2 * one["datapoints_per_second"]))
    agreement = figures["agreement"]  # the same numbers from 1 and 2 processes
    assert agreement["max_difference"] < 1e-4 and agreement["refine_steps_differ"] == []
    assert agreement["max_difference"] == max(agreement["by_column"].values())
    streams = figures["streams"]
    assert streams["iwae_overhead"] == pytest.approx(streams["streams"]["iwae_seconds"]
                                                     / streams["generator"]["iwae_seconds"] - 1)
    assert any("scaling efficiency" in line for line in lines)
@pytest.mark.slow
def test_bench_refine_flow_reports_figures(tiny_run, monkeypatch):
    """Slow (149 s on a loaded 2-core machine): local flows refined batched and one at a time, and
    the paper's procedure, each for hundreds of steps."""
    from gapbench.measure import RefineProcedure

    # shorter than the real procedures (thousands of steps), which would only cost time here
    paper = RefineProcedure.paper()._replace(max_steps=300)
    flows = RefineProcedure.for_flows()._replace(max_steps=200)
    monkeypatch.setattr(RefineProcedure, "paper", classmethod(lambda cls: paper))
    monkeypatch.setattr(RefineProcedure, "for_flows", classmethod(lambda cls: flows))
    lines = []
    figures = bench_refine_flow(str(tiny_run), num_datapoints=4, reference_datapoints=2, paper_datapoints=1,
                                num_samples=100, hidden_size=8, log=lines.append)
    one, batched = figures["one_at_a_time"], figures["batched"]
    assert figures["sizes"] == {"num_steps": 2, "hidden_size": 8}
    assert figures["speedup"] == pytest.approx(one["seconds_per_datapoint"] * 4 / batched["seconds"])
    assert figures["throughput_ratio"] == pytest.approx(
        batched["datapoint_steps_per_second"] / one["datapoint_steps_per_second"])
    assert figures["procedure"]["gradient"] == "stl" and figures["procedure"]["max_steps"] == 200
    assert figures["paper_one_at_a_time"]["procedure"]["learning_rate"] == 1e-3
    assert figures["speedup_over_paper"] > 0
    assert any("batched vs one at a time" in line for line in lines)
    json.dumps(figures)


def test_bench_threads_times_the_job_quiet_and_busy_with_its_cpu_seconds():
    """The job's figures: wall and CPU seconds, per-stage seconds, and the busy/quiet ratio of the same run."""
    from gapbench.bench.threads import bench_threads
    overrides = tuple(v for v in QUICK if v not in ("--set", "--quiet"))
    lines = []
    figures = bench_threads(str(DIGITS), overrides=overrides, busy=1, steps=False, before=False, log=lines.append)
    (job,) = figures["jobs"]
    assert job["threads"] == "per stage"
    assert job["ratio"] == pytest.approx(job["busy_s"] / job["quiet_s"])
    for condition in ("quiet", "busy"):
        assert 0 < job[f"{condition}_cpu_s"]
        assert set(job[f"{condition}_stages"]) >= {"train", "amortized", "local", "ais", "log_px", "report"}
        # the stages ran inside the timed job: together no longer than its wall clock
        assert sum(job[f"{condition}_stages"].values()) <= job[f"{condition}_s"]
    assert any("CPU s quiet / busy" in line for line in lines)
