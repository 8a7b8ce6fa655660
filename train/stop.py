"""Stopping a training run on request, and never hanging on one.

SIGTERM / SIGINT, or the file `stop_file` appearing (a scheduler or script that cannot signal the ranks
through torchrun / the deepspeed launcher asks with a file on a shared filesystem), ask for a checkpoint and a
clean exit at the next step boundary; a rerun resumes there. Every rank agrees on it in the step's collective.

A signal that is never answered is the other case: when a rank dies, its launcher sends SIGTERM to the others,
and they are blocked in a collective waiting for the dead rank (an NCCL peer waits forever; the Python handler
cannot even run). A watchdog thread, woken by the signal itself (signal.set_wakeup_fd: written by the C-level
handler, whatever the main thread is doing), ends the process when no step boundary is reached within
`grace_s` seconds of the signal, so the launcher returns within seconds and nothing is left running.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from unicap import distributed

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    def __init__(self, stop_file: str | None = None, grace_s: float = 10.0):
        self.requested = False
        self.stop_file = stop_file
        self.grace_s = grace_s
        self.answered = threading.Event()  # the main thread reached a step boundary after a signal
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._old_wakeup = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="unicap-stop-watchdog", daemon=True).start()

    def _handle(self, signum, _frame):
        self.requested = True

    def _watch(self) -> None:
        while True:
            try:
                got = os.read(self._read, 1)
            except OSError:
                return
            if not got:  # close(): the write end is gone
                os.close(self._read)
                return
            if got[0] not in SIGNALS:
                continue
            if not self.answered.wait(self.grace_s):
                name = signal.Signals(got[0]).name
                print(f"rank {distributed.rank()}: {name} and no step boundary within {self.grace_s:g}s (a rank "
                      "has failed or a collective is stuck): exiting without a checkpoint", file=sys.stderr, flush=True)  # fmt: skip
                os._exit(128 + got[0])

    def why(self) -> str:
        return "by signal" if self.requested else f"by {self.stop_file}"

    def agreed_flag(self) -> bool:
        """This rank's wish to stop (for the step's one collective; see agreed)."""
        return self.requested or bool(self.stop_file and os.path.exists(self.stop_file))

    def answer(self, stopping: bool) -> None:
        """Called at each step boundary with what the ranks agreed: a stop being served disarms the watchdog."""
        if stopping:
            self.answered.set()

    def agreed(self) -> bool:
        """True on every rank as soon as one rank was signalled or saw the stop file (one collective)."""
        stopping = distributed.any_rank(self.agreed_flag())
        self.answer(stopping)
        return stopping

    def close(self) -> None:
        """The loop is over: signals act as they did before (a SIGTERM during the final export ends the process)."""
        self.answered.set()
        signal.set_wakeup_fd(self._old_wakeup)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        os.close(self._write)
