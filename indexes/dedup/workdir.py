"""The temporary files of one dedup run, in a folder the user can place (`--work-dir`): each
stage's partitions and finished tasks, reused by a rerun of the same command, and removed when
the run ends.

A stage (`embedding`, `exact`, `phash`) is a subfolder with a `stage.json` that says what its
files were made from (the index, the threshold, nprobe, ...). A rerun finds its stages by
name: one made from the same inputs is reused as it is (finished partitions and tasks are
skipped), one made from anything else is cleared first, and the run says which. Files appear
under their final names only when complete (written to a `.tmp` name, then renamed), so what a
killed run left is either whole or invisible.

The folder is removed after success. After an interrupt or a failure it is removed too, unless
the run keeps it (`--keep-work`), so that the rerun resumes; a run killed outright (SIGKILL, a
lost node) leaves it behind either way, and the next run resumes or clears it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from imgindex.errors import ConfigError

log = logging.getLogger(__name__)

STAGE = "stage.json"
NO_PLACE = "--keep-work needs a place a rerun finds again: give --work-dir DIR or --out"


class WorkDir:
    """`place`/`name` (made if missing; `place` None: a fresh folder in the system's temporary
    folder, which no rerun finds). `keep`: leave it after an interrupt or a failure, for the rerun."""

    def __init__(self, place: str | Path | None, keep: bool = False, name: str = "imgindex-dedup-work"):
        self.temporary = None  # a folder this run made in the system's temporary folder
        if place is None:
            if keep:
                raise ConfigError(NO_PLACE)
            place = self.temporary = tempfile.mkdtemp(prefix="imgindex-dedup-")
        self.root, self.keep = Path(place) / name, keep
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot write the work folder {self.root} ({exc.strerror}): give --work-dir DIR on a "
                              "disk with room for the partitions") from None
        self.reused: dict[str, str] = {}  # stage -> "resumed" | "cleared (changed: ...)"

    def stage(self, name: str, identity: dict) -> Path:
        """The stage's folder: reused when it was made from `identity`, else cleared and made anew."""
        folder = self.root / name
        wanted = json.loads(json.dumps(identity))
        try:
            recorded = json.loads((folder / STAGE).read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded == wanted:
            self.reused[name] = "resumed"
            return folder
        if folder.exists():
            changed = sorted(k for k in set(wanted) | set(recorded or {}) if (recorded or {}).get(k) != wanted.get(k))
            self.reused[name] = f"cleared (changed: {', '.join(changed)})"
            log.warning("work folder %s was made for other settings (changed: %s): starting that stage again",
                        folder, ", ".join(changed))
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        write_atomic(folder / STAGE, json.dumps(wanted, indent=1).encode())
        return folder

    def remove(self) -> None:
        shutil.rmtree(self.temporary or self.root, ignore_errors=True)

    def __enter__(self) -> "WorkDir":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None or not self.keep:
            self.remove()
        else:
            log.warning("the finished partitions and tasks are kept in %s: rerun the same command to resume",
                        self.root)


def write_atomic(path: Path, data: bytes) -> None:
    """`data` at `path`, under that name only once complete."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """An .npz at `path`, under that name only once complete."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        np.savez(out, **arrays)
    os.replace(tmp, path)


def save_array(path: Path, array: np.ndarray) -> None:
    """An .npy at `path` (memory-mappable), under that name only once complete."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        np.save(out, array)
    os.replace(tmp, path)


def write_run(folder: Path, number: int, records: np.ndarray, offsets: np.ndarray) -> None:
    """A partition task's run: its records (sorted by task group) and where each group starts;
    the offsets are written last, so a run with offsets is complete."""
    save_array(folder / f"{number:06d}.npy", records)
    save_array(folder / f"{number:06d}.off.npy", offsets)


def run_done(folder: Path, number: int) -> bool:
    return (folder / f"{number:06d}.off.npy").exists()


def read_group(folder: Path, runs: int, group: int) -> np.ndarray:
    """One task group's records from every run (memory-mapped: only the group's bytes are read)."""
    taken = []
    for number in range(runs):
        offsets = np.load(folder / f"{number:06d}.off.npy")
        run = np.load(folder / f"{number:06d}.npy", mmap_mode="r")
        taken.append(np.array(run[offsets[group]:offsets[group + 1]]))
        del run
    return np.concatenate(taken)
