"""Atomic, resumable checkpoints: ``checkpoints/step-N/``.

A checkpoint is written into a hidden temporary folder and renamed into place only after every
file (and a ``COMPLETE`` marker) is on disk, so a run killed mid-save leaves no ``step-N`` that
looks finished (and its temporary folder is removed at the next start or save). Loading takes
the newest complete checkpoint; one that fails to load is reported and the next older one is
tried.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

MARKER = "COMPLETE"
TMP_PREFIX = ".tmp-step-"  # + "<step>-<pid>": a save in progress (or one that was killed)
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    step: int
    path: Path
    state: dict  # optimizer, scheduler, rng, trainer counters, critic (optional)

    def load_weights(self, model: torch.nn.Module) -> None:
        """Copy the saved parameters into ``model`` (tied weights handled by safetensors)."""
        try:
            load_model(
                model,
                str(self.path / "model.safetensors"),
                device=str(next(model.parameters()).device),
            )
        except Exception as err:
            raise ValueError(f"checkpoint {self.path} does not fit this model ({err})") from err


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: Path, step: int, model: torch.nn.Module, state: dict, keep: int = 2
) -> Path:
    """Write ``root/step-{step}`` atomically; keep the newest ``keep`` checkpoints (0 = all).

    A save that fails (e.g. a full disk) removes its temporary folder and re-raises; one that
    succeeds also removes those left by killed saves (:func:`remove_temporaries`).
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f"{TMP_PREFIX}{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        with write_errors_as_oserror(tmp / "model.safetensors"):
            save_model(model, str(tmp / "model.safetensors"))
        with write_errors_as_oserror(tmp / "state.pt"):
            torch.save(state, tmp / "state.pt")
        for name in ("model.safetensors", "state.pt"):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        (tmp / MARKER).write_text(f"{step}\n")
        _fsync_dir(tmp)
    except BaseException:  # a full disk, or a second Ctrl-C: give the space back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # the same step saved again after a resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep > 0:
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    remove_temporaries(root)
    return final


@contextmanager
def write_errors_as_oserror(path: Path):
    """Re-raise a failed write of ``path`` by safetensors or ``torch.save`` as an OSError.

    Both report I/O failures (a full disk, a read-only file system) as their own exception
    types (``SafetensorError``, ``RuntimeError``); as OSError naming the file, a caller can
    catch every failed write the same way.
    """
    try:
        yield
    except OSError:
        raise
    except (SafetensorError, RuntimeError) as err:
        code = re.search(r"os error (\d+)", str(err))  # safetensors keeps the OS's errno
        try:
            free = shutil.disk_usage(Path(path).parent).free
        except OSError:
            free = None
        if code:
            number = int(code.group(1))
        else:  # torch.save's message does not say why: a disk with no room left is the usual
            number = errno.ENOSPC if free is not None and free < 2**20 else errno.EIO
        room = "" if free is None else f"{free / 2**20:.1f} MiB free on that file system; "
        raise OSError(number, f"{os.strerror(number)} ({room}{err})", str(path)) from err


def remove_temporaries(root: Path) -> list[Path]:
    """Delete the ``.tmp-step-*`` folders under ``root`` (saves that never finished); returns them.

    A checkpoints folder has one writer, the run holding the run directory's lock
    (:mod:`seqrl.train.rundir`), so every temporary folder it does not write itself is left
    over from a process that was killed mid-save.
    """
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX) and p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints under ``root``, oldest first (temporary folders are ignored)."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / MARKER).exists():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def load_checkpoint(path: Path) -> Checkpoint:
    """Load one checkpoint folder; raises ValueError naming the folder if it is unreadable."""
    match = _STEP_DIR.match(path.name)
    if not match or not (path / MARKER).exists():
        raise ValueError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            f.keys()  # header check: a truncated file fails here, before any weight is copied
        state = torch.load(path / "state.pt", weights_only=False)
    except Exception as err:  # corrupted or truncated files
        raise ValueError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err})") from err
    return Checkpoint(step=int(match.group(1)), path=path, state=state)


def load_latest(root: Path) -> Checkpoint | None:
    """The newest checkpoint that loads; corrupted ones are skipped with a warning."""
    for path in reversed(complete_checkpoints(root)):
        try:
            return load_checkpoint(path)
        except ValueError as err:
            warnings.warn(f"{err}; trying an older checkpoint", stacklevel=2)
    return None
