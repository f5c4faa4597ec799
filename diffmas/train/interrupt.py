"""Stopping a training run without losing its steps: the first SIGINT (Ctrl-C) or SIGTERM asks the loop to finish
the step it is in, save a checkpoint there and exit; a second one has the signal's usual effect at once.

Only a flag is set in the handler: the loop reads it once per step, inside the step's one reduction over processes,
so every process of a distributed run stops after the same step and writes the same checkpoint."""

from __future__ import annotations

import os
import signal
import threading

from diffmas.errors import DiffMASError

__all__ = ["StopRequests", "TrainingStopped"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(DiffMASError):
    """A run stopped on request after saving a checkpoint; the exit code is the shell's for that signal."""

    label = "stopped"

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequests:
    """A context in which SIGINT and SIGTERM only record that a stop was asked for (``signum``, None until then).
    Handlers can only be installed from the main thread; elsewhere the signals keep their usual effect."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._request)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _request(self, signum: int, frame) -> None:
        if self.signum is not None:  # asked twice: stop now, as if no handler had been installed
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        # os.write, not print: the handler may run in the middle of the progress bar's own write to stderr.
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
                    f"(send it again to stop at once)\n".encode())

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous.clear()
