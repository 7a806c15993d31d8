"""How a command ends early: a bad input (UsageError: one line, exit 2) or a signal (StopRequest
catches SIGINT/SIGTERM so that the work in hand finishes; Interrupted: exit 128 + the signal)."""
import os
import signal

from tqdm import tqdm


class UsageError(Exception):
    """A bad input: main() prints it on one line and exits with code 2."""


class StopRequest:
    """SIGINT/SIGTERM: finish the current step (or part), checkpoint, exit. A second Ctrl-C exits at once."""

    def __init__(self, what: str = "finishing this step, then checkpoint and exit"):
        self.signal, self.what = None, what
        self.previous = {}

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, sig, frame):
        if self.signal is not None and sig == signal.SIGINT:
            os._exit(130)
        self.signal = sig
        tqdm.write(f"[stop] {signal.Signals(sig).name}: {self.what} (Ctrl-C again to quit now)")

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Interrupted(Exception):
    def __init__(self, sig, checkpoint, what="checkpoint"):
        super().__init__(f"stopped by {signal.Signals(sig).name}; {what} {checkpoint}")
        self.sig, self.checkpoint = sig, checkpoint
