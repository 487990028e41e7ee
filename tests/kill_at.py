"""Run ``gapbench`` and SIGKILL this very process at a chosen point of a stage (tests/test_resume.py).

    python tests/kill_at.py POINT NUM_THREADS gapbench-arguments...

POINT is where the process kills itself, with no chance to clean up (SIGKILL cannot be caught):
    train      halfway through writing the third epoch's train_state.pt
    trained    just after the train stage is recorded, before train_state.pt is removed
    amortized  in the amortized stage, before its second batch of datapoints
    local      in refinement of the second batch of datapoints, at step 10
    ais        in the AIS stage, in the second batch of datapoints, at annealing step 5
    log_px     in the log_px stage, before its second batch of datapoints
    curve      in the curve stage, in the second batch of datapoints, at SVI step 5
    report     halfway through writing summary.json
    none       nowhere (the test kills it from outside)
"""

import io as bytes_io
import os
import signal
import sys
from pathlib import Path

import torch

import gapbench.runner.stages as stages
import gapbench.runner.training as training
import gapbench.io as io
from gapbench.cli import main
from gapbench.runner.rundir import RunFolder


def die() -> None:
    sys.stdout.flush(), sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def die_halfway_through(path: Path, data: bytes) -> None:
    """Write half of ``data`` where io would write ``path`` (its temporary file), then die."""
    with io._atomic_path(path) as tmp:
        tmp.write_bytes(data[: len(data) // 2])
        die()


def install(point: str) -> None:
    training.TRAIN_STATE_SECONDS = 0.0  # a training state after every epoch, so there is one to kill
    calls = {"n": 0}
    if point == "train":
        save_torch = io.save_torch

        def patched(path, obj):
            if Path(path).name == "train_state.pt":
                calls["n"] += 1
                if calls["n"] == 3:
                    buffer = bytes_io.BytesIO()
                    torch.save(obj, buffer)
                    die_halfway_through(Path(path), buffer.getvalue())
            save_torch(path, obj)
        io.save_torch = patched
    elif point == "trained":
        finish = RunFolder.finish

        def patched(self, stage, seconds):
            finish(self, stage, seconds)
            if stage == "train":
                die()
        RunFolder.finish = patched
    elif point == "amortized":
        bounds_of = stages.bounds_of

        def patched(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                die()
            return bounds_of(*args, **kwargs)
        stages.bounds_of = patched
    elif point == "local":
        local_posterior = stages.local_posterior

        def patched(*args, callback=None, **kwargs):
            calls["n"] += 1

            def deadly(step, num_active):
                if calls["n"] == 2 and step == 10:
                    die()
                callback(step, num_active)
            return local_posterior(*args, callback=deadly, **kwargs)
        stages.local_posterior = patched
    elif point == "ais":
        ais_of = stages.ais_of

        def patched(*args, callback=None, **kwargs):
            calls["n"] += 1

            def deadly(step):
                if calls["n"] == 2 and step == 5:
                    die()
                callback(step)
            return ais_of(*args, callback=deadly, **kwargs)
        stages.ais_of = patched
    elif point == "log_px":
        selected_log_px = stages.selected_log_px

        def patched(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                die()
            return selected_log_px(*args, **kwargs)
        stages.selected_log_px = patched
    elif point == "curve":
        refinement_curve = stages.refinement_curve

        def patched(*args, callback=None, **kwargs):
            calls["n"] += 1

            def deadly(step):
                if calls["n"] == 2 and step == 5:
                    die()
                callback(step)
            return refinement_curve(*args, callback=deadly, **kwargs)
        stages.refinement_curve = patched
    elif point == "report":
        write_json = io.write_json

        def patched(path, obj):
            if Path(path).name == "summary.json":
                import json
                die_halfway_through(Path(path), json.dumps(obj, indent=2).encode())
            write_json(path, obj)
        io.write_json = patched
    elif point != "none":
        raise SystemExit(f"unknown point {point!r}")


if __name__ == "__main__":
    point, num_threads, *args = sys.argv[1:]
    torch.set_num_threads(int(num_threads))  # as in the test process, so the numbers agree bit for bit
    install(point)
    sys.exit(main(args))
