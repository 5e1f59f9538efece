"""A clean stop on SIGINT (Ctrl-C) and SIGTERM (what a cluster scheduler sends on preemption).

While :class:`StopRequest` is active, the first of these signals only records itself: the
training loop polls :attr:`StopRequest.signum` between steps, finishes the step in progress,
saves a checkpoint and exits. A second signal is handed to the handler that was installed
before (Python's ``KeyboardInterrupt`` for SIGINT, process termination for SIGTERM), so it acts
at once; the last checkpoint stays intact because checkpoints are written atomically.

Under ``torchrun`` every worker sees each signal twice (the scheduler's or terminal's, and the
copy ``torchrun`` forwards to its workers), so there repeats are ignored (``repeats_exit=False``)
and the hard stop is ``torchrun``'s own: it kills its workers ``--shutdown-timeout`` seconds
(default 30) after forwarding a signal.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's exit status of a process stopped by ``signum``: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


class StopRequest:
    """Catch SIGINT and SIGTERM inside a ``with`` block; ``signum`` is the first one caught.

    ``on_first(signum)`` runs inside the signal handler (keep it short: a write to stderr).
    Handlers are installed only from the main thread, never over a signal that was set to be
    ignored (e.g. SIGINT of a background job), and the previous ones are restored on exit.
    """

    def __init__(
        self, on_first: Callable[[int], None] | None = None, *, repeats_exit: bool = True
    ) -> None:
        self.signum: int | None = None
        self.on_first = on_first
        self.repeats_exit = repeats_exit
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():  # None: a handler not set from Python
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            if self.on_first is not None:
                self.on_first(signum)
            return
        if self.repeats_exit:  # the second signal: behave as if we had never caught any
            self._restore()
            signal.raise_signal(signum)
