"""Stopping a training run on request, and never hanging on one.

SIGTERM / SIGINT, or the file `stop_file` appearing (a scheduler or script that cannot signal the ranks
through torchrun / the deepspeed launcher asks with a file on a shared filesystem), ask for a checkpoint and a
clean exit at the next step boundary; a rerun resumes there. Every rank agrees on it in the step's collective.

A signal that is never answered is the other case: when a rank dies, its launcher sends SIGTERM to the others,
and they are blocked in a collective waiting for the dead rank (an NCCL peer waits forever; the Python handler
cannot even run). A watchdog thread, woken by the signal itself (signal.set_wakeup_fd: written by the C-level
handler, whatever the main thread is doing), ends the process when no step boundary is reached within
`grace_s` seconds of the signal or of the last boundary since, so the launcher returns within seconds and
nothing is left running, while healthy ranks go on to their checkpoint however long their steps are.

    with StopFlag(cfg.run.stop_file, cfg.run.term_grace_s) as stop:
        ... res = train_step(..., stop_asked=stop.asked); stop.answer(res.stop) ...
"""

from __future__ import annotations

import os
import signal
import threading

from unicap import distributed

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    def __init__(self, stop_file: str | None = None, grace_s: float = 20.0):
        self.requested = False
        self.stop_file = stop_file
        self.grace_s = grace_s
        self.answered = threading.Event()  # the ranks agreed to stop: the request is being served
        self.boundaries = 0  # step boundaries reached: progress that restarts the grace window
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
            while True:
                seen = self.boundaries
                if self.answered.wait(self.grace_s):
                    break
                if self.boundaries == seen:
                    name = signal.Signals(got[0]).name
                    distributed.exit_now(
                        128 + got[0],
                        f"rank {distributed.rank()}: {name} and no step boundary "
                        f"within {self.grace_s:g}s (a rank has failed or a collective is stuck): "
                        "exiting without a checkpoint",
                    )

    def why(self) -> str:
        return "by signal" if self.requested else f"by {self.stop_file}"

    def asked(self) -> bool:
        """This rank's wish to stop, read when the step's one collective is built (unicap.distributed.agree)."""
        return self.requested or bool(self.stop_file and os.path.exists(self.stop_file))

    def answer(self, stopping: bool) -> None:
        """Called at each step boundary with what the ranks agreed: progress for the watchdog, and a stop
        being served disarms it."""
        self.boundaries += 1
        if stopping:
            self.answered.set()

    def __enter__(self) -> StopFlag:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """The loop is over: signals act as they did before (a SIGTERM during the final export ends the process)."""
        if self.answered.is_set() and self._write < 0:
            return
        self.answered.set()
        signal.set_wakeup_fd(self._old_wakeup)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        os.close(self._write)
        self._write = -1
