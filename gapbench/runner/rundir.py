"""Run folders: one process at a time, a record of finished stages, and config changes.

A run folder holds ``config.json`` (the resolved config), the outputs of the stages and
``stages.json``, which records each finished stage with the sha256 of the config sections it
depends on, and the sha256 of each output (the stages, their sections and outputs:
``gapbench.runner.stage_table``).

A stage counts as finished when ``stages.json`` records it with the hash of the current config, its
outputs exist with the sha256 recorded for each (``gapbench.outputs``; a changed output makes its
stage redone, a changed checkpoint.pt is refused), and no stage it reads was redone in this process.
Every output is written atomically (``gapbench.io``: a temporary name, then a rename) before the
stage is recorded, so a process killed at any moment leaves whole files and a true record, and the next process with the
same command redoes only the stages that were not recorded. Training also saves
``train_state.pt`` at the end of an epoch (at most every ``training.TRAIN_STATE_SECONDS``), so an
interrupted training stage continues from its last saved epoch.

A folder holding a run with another config is refused unless ``force``: then the stages whose
config sections changed (and the stages that read them) are redone and the others are kept, so a
change in ``eval`` or ``refine`` keeps the trained model. The outputs it replaces wait in
``.replaced/`` until the run finishes, and are put back if it fails.

Keys that change no number are left out of the hashes (``stage_table.hashed_sections``), so a run
whose config changes only such a key keeps its finished stages. Folders written by earlier versions
are read through ``gapbench.runner.migrate``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from gapbench import io
from gapbench.deadline import StopRequested
from gapbench.errors import RunError
from gapbench.outputs import sha256_file
from gapbench.runner import migrate
from gapbench.runner.stage_table import (STAGE_OF, STAGES, affected_stages, hashed_sections, section_hash,
                                        stages_read)

TRAIN_STATE = "train_state.pt"  # training's resume point, while the train stage is unfinished
LOCK = ".lock"
REPLACED = ".replaced"  # --force: the outputs it replaces, kept until the run finishes (restored if it fails)



def diff_keys(a: dict, b: dict, prefix: str = "") -> set[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = set()
    for k in set(a) | set(b):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys |= diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.add(prefix + k)
    return keys


def _is_ours(name: str) -> bool:
    """Files gapbench leaves in a folder that holds no run yet: the lock and temporary files."""
    return name in (LOCK, REPLACED) or (name.startswith(".") and name.endswith(".tmp"))


class RunFolder:
    """An open run folder: the lock is held, the config recorded, the stage records loaded."""

    def __init__(self, path: Path, resolved: dict, records: dict[str, dict], *,
                 log: Callable[[str], None] = print):
        self.path = path
        self.resolved = resolved
        self.records = records
        self.redone: set[str] = set()
        self.log = log
        self._verified: dict[str, bool] = {}
        self.changed_checkpoint: str | None = None  # why the train stage's outputs are not as recorded

    def stage_hash(self, stage: str) -> str:
        return section_hash(self.resolved, stage)

    def is_finished(self, stage: str) -> bool:
        """Recorded with the current config, outputs present and unchanged (:meth:`outputs_intact`), and
        nothing it reads redone."""
        record = self.records.get(stage)
        return (isinstance(record, dict) and record.get("config_sha256") == self.stage_hash(stage)
                and all((self.path / name).is_file() for name in STAGE_OF[stage].outputs)
                and not set(stages_read(stage, self.resolved)) & self.redone and self.outputs_intact(stage))

    def outputs_intact(self, stage: str) -> bool:
        """Whether the recorded stage's outputs are the files it wrote: their sha256 as recorded (for a record
        without them, their content: ``migrate.unrecorded_output_problem``). A changed output of an
        evaluation stage makes it (and the stages reading it) redone. A changed output of the train stage
        counts as intact here but is noted in ``changed_checkpoint``: the runner refuses it (:meth:`refuse_changed_checkpoint`) after loading it,
        since redoing would retrain (and a damaged checkpoint gets the loader's own message)."""
        if stage not in self._verified:
            problem = self._output_problem(stage)
            if problem is not None and stage == "train":
                self.changed_checkpoint, problem = problem, None
            if problem is not None:
                self.log(f"[{stage}] {problem}: redoing the {stage} stage and the stages that read it")
            self._verified[stage] = problem is None
        return self._verified[stage]

    def _output_problem(self, stage: str) -> str | None:
        recorded = self.records[stage].get("outputs_sha256")
        for name in STAGE_OF[stage].outputs:
            file = self.path / name
            if isinstance(recorded, dict) and name in recorded:
                if sha256_file(file) != recorded[name]:
                    return f"{file} changed after the stage finished (its sha256 differs from stages.json)"
                continue
            problem = migrate.unrecorded_output_problem(file, self.resolved)
            if problem is not None:
                return f"{file} does not match its stage record: {problem}"
        return None

    def refuse_changed_checkpoint(self) -> None:
        """RunError when the finished train stage's outputs changed after it was recorded."""
        if self.changed_checkpoint is not None:
            raise RunError(f"{self.changed_checkpoint}; restore the file, or delete checkpoint.pt to retrain")

    def start(self, stage: str) -> None:
        """Mark ``stage`` as being redone (its readers must be redone too) and drop its record."""
        self.redone.add(stage)
        self._verified.pop(stage, None)
        if self.records.pop(stage, None) is not None:
            io.write_json(self.path / "stages.json", self.records)

    def finish(self, stage: str, seconds: float) -> None:
        """Record ``stage`` as finished (after its outputs are written), with each output's sha256."""
        self.records[stage] = {
            "config_sha256": self.stage_hash(stage),
            "seconds": round(seconds, 3),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "outputs_sha256": {name: sha256_file(self.path / name) for name in STAGE_OF[stage].outputs
                               if (self.path / name).is_file()},
        }
        self._verified[stage] = True
        io.write_json(self.path / "stages.json", {s: self.records[s] for s in STAGES if s in self.records})
        if (self.path / REPLACED).is_dir():  # the new config has a finished stage: no way back to the old one
            shutil.rmtree(self.path / REPLACED, ignore_errors=True)
            self.log(f"[run] {stage} finished under the new config: the outputs --force replaced are deleted")


@contextmanager
def open_run_folder(path: str | Path, resolved: dict, *, force: bool, log: Callable[[str], None],
                    normalize: Callable[[dict], dict] | None = None) -> Iterator[RunFolder]:
    """Create or reopen the run folder ``path`` for the config ``resolved`` (JSON form).

    ``normalize`` maps the config recorded in the folder to this version's form before comparing
    (defaults for keys and sections added since), so a folder written by an older version resumes.

    Refuses (RunError) a path that is not a writable folder, a non-empty folder that holds no
    gapbench run, a folder another gapbench process is using, and a run with another config unless
    ``force`` (or no stage of it finished). Holds an exclusive lock (released when the process ends,
    even by SIGKILL) while open. ``force`` moves the outputs it replaces to ``.replaced/``; they
    are deleted as soon as a stage finishes under the new config (:meth:`RunFolder.finish`) or the
    block ends normally, and put back (with the old config and records) when it raises an Exception
    other than :class:`StopRequested` before that (a time limit or SIGTERM leaves the new run's config,
    its progress and ``.replaced/``, so that the same command continues it). So a failure never undoes
    a stage finished under the new config (putting back what a forced run had replaced, hours of
    training and evaluation later, once deleted all of them). A finished
    run on a read-only disk opens read-only (no lock), so its table can be printed again.
    """
    path = Path(path)
    _refuse_other_content(path)
    lock_fd = _open_lock(path)
    try:
        if lock_fd is not None:
            _lock(lock_fd, path)
            for tmp in path.glob(".*.tmp"):  # left by a process killed mid-write; never read
                tmp.unlink(missing_ok=True)
        records = _read_records(path)
        replaced = started = False
        try:
            try:
                replaced = _take_config(path, resolved, records, is_writable=lock_fd is not None, force=force,
                                        log=log, normalize=normalize)
            except OSError as error:
                raise RunError(f"cannot write the run folder {path}: {error.strerror}; "
                               "choose a writable --out") from None
            started = True
            yield RunFolder(path, resolved, records, log=log)
        except StopRequested:  # a time limit or SIGTERM: the new run's progress stays, the same command resumes it
            raise
        except Exception:  # not on Ctrl-C or a kill either: then the same command resumes the new run
            if replaced or (started and (path / REPLACED).is_dir()):
                _restore_replaced(path, log)
            raise
        if (path / REPLACED).is_dir():  # the new run finished: what it replaced can go
            shutil.rmtree(path / REPLACED, ignore_errors=True)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)  # releases the lock


def _refuse_other_content(path: Path) -> None:
    """RunError for a file, or a non-empty folder that holds no gapbench run."""
    if path.exists() and not path.is_dir():
        raise RunError(f"cannot write the run folder {path}: it is a file; choose another --out")
    if path.is_dir() and not (path / "config.json").exists():
        foreign = sorted(p.name for p in path.iterdir() if not _is_ours(p.name))
        if foreign:
            raise RunError(f"{path} is not empty ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) "
                           "and holds no gapbench run; choose a new or empty folder as --out")


def _take_config(path: Path, resolved: dict, records: dict[str, dict], *, is_writable: bool, force: bool,
                 log: Callable[[str], None], normalize: Callable[[dict], dict] | None) -> bool:
    """Compare the folder's config (in the current form, ``normalize``) with ``resolved``; refuse or (force)
    take the change (:func:`_change_config`) and write config.json. True when outputs were set aside."""
    config_path, replaced = path / "config.json", False
    previous = recorded = None
    if config_path.exists():
        previous = recorded = _read_json(config_path, "delete the folder to start the run again")
        if normalize is not None:
            previous = normalize(recorded)
            if is_writable:
                migrate.rehash_records(path, recorded, previous, records)
    if not is_writable and previous != resolved:
        raise OSError(errno.EROFS, "read-only file system", str(path))
    if previous is not None and previous != resolved:
        replaced = _change_config(path, previous, resolved, records, force=force, log=log, recorded=recorded)
    try:
        if previous != resolved:
            io.write_json(config_path, resolved)
        if is_writable:
            migrate.adopt_unhashed_records(path, resolved, records)
    except OSError:
        if replaced:  # what was set aside goes back
            _restore_replaced(path, log)
        raise
    return replaced


def _open_lock(path: Path) -> int | None:
    """The lock file's descriptor (the folder made if needed); None for a run folder on a disk that
    cannot be written (it is then opened read-only: nothing may change in it)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        return os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and (path / "config.json").is_file():
            return None
        raise RunError(f"cannot write the run folder {path}: {error.strerror}; choose a writable --out") from None


def _lock(fd: int, path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunError(f"another gapbench process is running in {path}; wait for it to finish, "
                       "or choose another --out") from None


def _stages_phrase(stages: list[str]) -> str:
    """"the report stage", "the local and report stages", "the amortized, local and report stages"."""
    names = stages[0] if len(stages) == 1 else f"{', '.join(stages[:-1])} and {stages[-1]}"
    return f"the {names} stage{'s' if len(stages) > 1 else ''}"


def _read_json(file: Path, fix: str) -> dict:
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise RunError(f"{file} cannot be read ({error}); {fix}") from None
    if not isinstance(value, dict):
        raise RunError(f"{file} does not hold a JSON object; {fix}")
    return value


def _read_records(path: Path) -> dict[str, dict]:
    file = path / "stages.json"
    if not file.exists():
        return {}
    records = _read_json(file, "delete it to redo every stage (training resumes from train_state.pt if present)")
    return {stage: record for stage, record in records.items() if stage in STAGES and isinstance(record, dict)}


def _change_config(path: Path, previous: dict, resolved: dict, records: dict[str, dict], *,
                   force: bool, log: Callable[[str], None], recorded: dict | None = None) -> bool:
    """Refuse a config change, or (force) forget the stages it affects and move their outputs to
    ``.replaced/`` (see :func:`open_run_folder`); True when outputs were moved there. A folder where no
    stage finished (e.g. a run refused for its size) takes the new config without ``force``."""
    changed = sorted(diff_keys(previous, resolved))
    redo = affected_stages(set(changed), previous, resolved)
    kept = [s for s in STAGES if s not in redo]
    if not records and not (path / TRAIN_STATE).exists() and not (path / REPLACED).exists():
        log(f"[run] no stage of the run in {path} finished; starting it with the new config")
        return False
    if not force:
        keeps = f"keeps {_stages_phrase(kept)}" if kept else "keeps nothing"
        raise RunError(
            f"{path} holds a run with a different config (changed: {', '.join(changed)}); "
            f"choose another --out, or pass --force to redo {_stages_phrase(redo)} with the new config ({keeps})"
        )
    log(f"[run] config changed ({', '.join(changed)}): redoing {', '.join(redo)}")
    names = [name for stage in redo for name in STAGE_OF[stage].outputs + ((TRAIN_STATE,) if stage == "train" else ())]
    aside = path / REPLACED
    moved = not aside.exists()  # an earlier forced run that did not finish keeps the finished outputs it set aside
    if moved:
        (aside / "files").mkdir(parents=True)
        io.write_json(aside / "replaced.json", {"config": recorded or previous, "records": records, "redo": redo})
    for stage in redo:  # records first: an output without a record is never trusted
        records.pop(stage, None)
    io.write_json(path / "stages.json", records)
    try:
        for name in names:
            if (path / name).exists():
                if moved:
                    os.replace(path / name, aside / "files" / name)
                else:
                    (path / name).unlink()
    except OSError:
        if moved:
            _restore_replaced(path, log)
        raise
    if moved:
        log(f"[run] the replaced outputs are kept in {aside} until a stage finishes under the new config (put back if the run fails before)")
    return moved


def _restore_replaced(path: Path, log: Callable[[str], None]) -> None:
    """Put back what ``--force`` set aside: the old outputs, config.json and stages.json."""
    aside = path / REPLACED
    try:
        saved = json.loads((aside / "replaced.json").read_text())
        for stage in saved["redo"]:
            for name in STAGE_OF[stage].outputs:
                (path / name).unlink(missing_ok=True)
        for file in (aside / "files").iterdir():
            os.replace(file, path / file.name)
        io.write_json(path / "stages.json", saved["records"])
        io.write_json(path / "config.json", saved["config"])
        shutil.rmtree(aside)
        log(f"[run] the run failed: the outputs it was replacing, its config and stage records are back in {path}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        log(f"[run] could not put back the replaced outputs from {aside} ({error}); they are still there")


def recorded_stages(path: str | Path, resolved: dict) -> set[str]:
    """The stages of the folder ``path`` recorded as finished with the config ``resolved``, read without
    opening (or locking) the folder; empty when it holds no readable records."""
    try:
        records = _read_records(Path(path))
    except RunError:
        return set()
    return {stage for stage, record in records.items() if record.get("config_sha256") == section_hash(resolved, stage)}
