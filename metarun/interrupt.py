"""Turning SIGINT/SIGTERM into a clean stop.

The first signal asks the training loop to stop after the current step, so it
can write ``last.pt`` and say how to resume (SLURM pre-emption sends SIGTERM).
A second SIGINT exits at once.
"""

from __future__ import annotations

import os
import signal
import threading


class StopRequest:
    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame) -> None:
        # os.write, not print: a handler may run in the middle of another write to stderr
        if self.signal is not None and signum == signal.SIGINT:
            os.write(2, b"\ninterrupted again: exiting at once, without saving this step\n")
            os._exit(130)
        if self.signal is None:
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step (Ctrl-C again exits at once)\n".encode())
        self.signal = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
