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

    @property
    def sharded(self) -> bool:
        """Written by sharded processes (``dist.strategy: fsdp``): see :func:`load_sharded_state`."""
        return is_sharded_checkpoint(self.path)

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
    _publish(tmp, final, keep)
    remove_temporaries(root)
    return final


def _publish(tmp: Path, final: Path, keep: int) -> None:
    """Rename a complete temporary folder into place, then prune to the newest ``keep``."""
    if final.exists():  # the same step saved again after a resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if keep > 0:
        for old in complete_checkpoints(final.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


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
        if is_sharded_checkpoint(path):  # dist.strategy: fsdp
            check_sharded_files(path)
            state = torch.load(path / "state.pt", weights_only=False)
            return Checkpoint(step=int(match.group(1)), path=path, state=state)
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


# ------------------------------------------------------------------ sharded (dist.strategy: fsdp)
SHARDED = "sharded"
"""The ``torch.distributed.checkpoint`` folder of a sharded checkpoint: ``step-N/sharded/``."""


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / SHARDED).is_dir()


def save_sharded_checkpoint(
    root: Path,
    step: int,
    modules: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]],
    state: dict,
    *,
    rank: int,
    keep: int = 2,
) -> Path:
    """Write ``root/step-{step}`` from every process (a collective), atomically.

    ``modules`` ({"policy": (model, optimizer), ...}) are FSDP-sharded: each process writes its
    own shards of the weights and AdamW state with ``torch.distributed.checkpoint`` into
    ``sharded/`` (a resume may use another number of processes: DCP reshards on load).
    Rank 0 writes ``state`` (schedules, counters, RNG) to ``state.pt``, then, once every
    process's files are on disk, the ``COMPLETE`` marker, and renames the folder into place.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-sharded"  # one name for every process
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    to_save = {}
    for name, (model, optimizer) in modules.items():
        model_state, optim_state = get_state_dict(model, optimizer)
        to_save[name] = {"model": model_state, "optimizer": optim_state}
    dcp.save(to_save, checkpoint_id=tmp / SHARDED)  # fsyncs every file it writes
    dist.barrier()
    if rank == 0:
        torch.save(state, tmp / "state.pt")
        with open(tmp / "state.pt", "rb") as f:
            os.fsync(f.fileno())
        _fsync_dir(tmp / SHARDED)
        (tmp / MARKER).write_text(f"{step}\n")
        _fsync_dir(tmp)
        _publish(tmp, final, keep)
    dist.barrier()  # no process moves on (or saves again) before the checkpoint is in place
    return final


def check_sharded_files(path: Path) -> None:
    """Raise if ``path/sharded`` is not a whole DCP checkpoint: metadata unreadable, or a
    shard file it names missing or shorter than the bytes it should hold (a truncated copy)."""
    from torch.distributed.checkpoint import FileSystemReader

    folder = Path(path) / SHARDED
    metadata = FileSystemReader(str(folder)).read_metadata()
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in needed.items():
        file = folder / name
        if not file.is_file():
            raise ValueError(f"shard file {name} is missing")
        if file.stat().st_size < size:
            raise ValueError(f"shard file {name} is truncated ({file.stat().st_size} < {size} B)")


def load_sharded_state(
    path: Path, modules: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]
) -> None:
    """Load the weights and AdamW state of ``modules`` from ``path/sharded`` (a collective).

    The modules may be sharded over another number of processes than the checkpoint was
    written by, or not sharded at all (one process): DCP reads each process's slice.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    to_load = {}
    for name, (model, optimizer) in modules.items():
        model_state, optim_state = get_state_dict(model, optimizer)
        to_load[name] = {"model": model_state, "optimizer": optim_state}
    try:
        dcp.load(to_load, checkpoint_id=Path(path) / SHARDED)
    except Exception as err:
        raise ValueError(f"checkpoint {path} does not fit this run ({err})") from err
    for name, (model, optimizer) in modules.items():
        set_state_dict(
            model,
            optimizer,
            model_state_dict=to_load[name]["model"],
            optim_state_dict=to_load[name]["optimizer"],
        )
