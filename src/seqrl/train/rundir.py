"""A run directory belongs to one run: created exclusively, locked for as long as the run lives.

A new run creates its directory with ``mkdir`` and never writes into one that holds files of
another run: it refuses (or, with ``overwrite``, empties a directory that is a finished or
abandoned seqrl run). A default name (no ``name`` in the config) that is taken is replaced by a
fresh one. A resumed run reopens its directory.

Either way the run holds an exclusive ``flock`` on ``RUN_DIR/.lock`` until it ends, so a second
process can neither start a run of the same name nor resume a run that is still going. The
kernel drops the lock when its holder exits, however it exits (even ``kill -9``), so a crashed
run never leaves a stale lock behind. The lock file records the holder's pid and host, for the
error message of whoever is refused.

Under ``torchrun`` only rank 0 calls :func:`claim_run_dir` (:class:`seqrl.train.trainer.Trainer`
broadcasts the outcome to every rank).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import warnings
from collections.abc import Callable
from pathlib import Path

LOCK_NAME = ".lock"
_NAME_ATTEMPTS = 100  # fresh default names tried before giving up (each clash is 1 in 65536)


class RunDirError(RuntimeError):
    """The run directory cannot be used: it holds another run, or a live run holds its lock."""


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``run_dir/.lock``, held until :meth:`release`."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunDirError` naming the live process that holds it."""
        try:
            f = open(self.path, "a+")  # held open (and locked) for the life of the run
        except OSError as err:
            raise RunDirError(
                f"cannot use {self.path.parent} as a run directory: {describe_os_error(err)}"
            ) from err
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().split()
            f.close()
            who = f"pid {holder[0]} on {holder[1]}" if len(holder) == 2 else "another process"
            raise RunDirError(
                f"{self.path.parent} is in use by a running seqrl process ({who}); wait for it to "
                f"finish or stop it (Ctrl-C, or kill -TERM {holder[0] if holder else 'PID'}: it "
                f"saves a checkpoint first), or give this run another name"
            ) from None
        except OSError as err:  # e.g. ENOLCK: a network file system without lock support
            warnings.warn(
                f"could not lock {self.path} ({describe_os_error(err)}); nothing stops a second process "
                f"from writing into {self.path.parent} while this run is going",
                stacklevel=2,
            )
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the only descriptor drops the flock
            self._file = None


class RunDir:
    """A claimed run directory: ``path``, its held ``lock``, and whether this claim made it."""

    def __init__(self, path: Path, lock: RunLock, created: bool) -> None:
        self.path, self.lock, self.created = path, lock, created

    def release(self) -> None:
        """Drop the lock; a directory this claim made and nothing was written to is removed."""
        if not self.lock.held:
            return
        try:
            empty = self.created and _contents(self.path) == []
        except OSError:  # the directory is gone (a temporary folder cleaned up first)
            empty = False
        if empty:
            try:  # still under the lock, so no other claim can be between these two calls
                self.lock.path.unlink()
                self.path.rmdir()
            except OSError:
                pass  # a file appeared meanwhile, or the directory went read-only: keep it
        self.lock.release()


def claim_run_dir(
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    fresh_name: Callable[[], str] | None = None,
) -> RunDir:
    """Create (or, to resume, reopen) ``run_dir`` for this process alone and lock it.

    A new run takes a directory that does not exist, or exists holding nothing but a lock file
    (a run that never got past its set-up). For another existing one, ``fresh_name`` (default
    names) gives a new name to try; else it is refused, unless ``overwrite`` is set and it is a
    seqrl run directory (it has a ``config.yaml``): its contents are deleted first. Raises
    :class:`RunDirError` with the reason and what to do.
    """
    run_dir = Path(run_dir)
    if resume:
        if overwrite:
            raise RunDirError("resume continues a run and overwrite starts it again: choose one")
        lock = RunLock(run_dir)
        lock.acquire()
        return RunDir(run_dir, lock, created=False)

    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"cannot create the output directory: {describe_os_error(err)}") from err
    for _ in range(_NAME_ATTEMPTS):
        try:
            run_dir.mkdir()
            created = True
        except FileExistsError:
            created = False
        except OSError as err:
            raise RunDirError(f"cannot create the run directory: {describe_os_error(err)}") from err
        if created or fresh_name is None:  # a default name is drawn again, never overwritten
            break
        run_dir = run_dir.parent / fresh_name()
    else:
        raise RunDirError(
            f"no free run name found in {run_dir.parent} after {_NAME_ATTEMPTS} tries"
        )
    if not run_dir.is_dir():
        raise RunDirError(
            f"{run_dir} exists and is not a directory; choose another name (--set name=NAME)"
        )

    lock = RunLock(run_dir)
    lock.acquire()
    if created:
        return RunDir(run_dir, lock, created=True)
    try:
        leftovers = _contents(run_dir)
        if leftovers and not (run_dir / "config.yaml").is_file():
            raise RunDirError(
                f"{run_dir} already exists and is not a seqrl run directory (it has files but no "
                f"config.yaml), so seqrl neither trains into it nor deletes it (--overwrite); "
                f"choose another name (--set name=NAME) or output_dir"
            )
        if leftovers and not overwrite:
            raise RunDirError(
                f"run directory {run_dir} already exists and holds a run; give this run another "
                f"name (--set name=NAME), continue that one with `seqrl train --resume {run_dir}`, "
                f"or start it again from scratch with --overwrite (which deletes it first)"
            )
        for path in leftovers:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    except OSError as err:
        lock.release()
        raise RunDirError(f"cannot overwrite {run_dir}: {describe_os_error(err)}") from err
    except RunDirError:
        lock.release()
        raise
    return RunDir(run_dir, lock, created=True)


def _contents(run_dir: Path) -> list[Path]:
    """What ``run_dir`` holds besides its lock file (sorted)."""
    return sorted(p for p in run_dir.iterdir() if p.name != LOCK_NAME)


def describe_os_error(err: OSError) -> str:
    """``<path>: <errno text>``, e.g. ``runs/x/.lock: Read-only file system``."""
    text = err.strerror or errno.errorcode.get(err.errno or 0, "") or str(err)
    return f"{err.filename}: {text}" if err.filename else text
