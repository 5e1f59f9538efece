"""Atomic, resumable checkpoints: ``checkpoints/step-N/``.

A checkpoint is written into a hidden temporary folder and renamed into place only after every
file (and a ``COMPLETE`` marker) is on disk, so a run killed mid-save leaves no ``step-N`` that
looks finished. Loading takes the newest complete checkpoint; one that fails to load is reported
and the next older one is tried.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

MARKER = "COMPLETE"
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
    """Write ``root/step-{step}`` atomically; keep the newest ``keep`` checkpoints (0 = all)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    for name in ("model.safetensors", "state.pt"):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    (tmp / MARKER).write_text(f"{step}\n")
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again after a resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep > 0:
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


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
