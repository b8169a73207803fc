"""Stopping on SIGTERM / SIGINT without losing work: finish the optimizer step, checkpoint, exit.

Schedulers preempt jobs with SIGTERM (SLURM, Kubernetes) and people stop runs with Ctrl-C. While a
training loop runs, the first of these signals only sets a flag; the loop finishes its optimizer step,
writes a checkpoint and raises ``Interrupted`` naming it, and the CLI exits with 128 + the signal number.
A second signal aborts at once, with the signal's default action.

With several processes every process must stop after the same step (the checkpoint is written by all of
them together), so the flag is summed across processes after each step. Launchers forward a signal to
every process (torchrun turns its own SIGINT or SIGTERM into SIGTERM for each worker, and SLURM signals
all of them as well), so under such a launcher repeats within ``REPEAT_WINDOW_S`` count as one signal.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger("mmpost")

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 2.0


class Interrupted(Exception):
    """Training stopped on a signal after a checkpoint was written.

    Attributes:
        signum: the signal.
        step: the last completed optimizer step.
        checkpoint: the checkpoint written at that step.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} after step {step}; checkpoint written to {checkpoint}; continue the "
            "run with the same command and --resume"
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def launched_by_agent() -> bool:
    """True under torchrun / torch elastic, whose agent forwards signals to every worker."""
    return "TORCHELASTIC_RUN_ID" in os.environ


class StopOnSignal:
    """While entered, SIGTERM and SIGINT ask the loop to stop after its step instead of killing the process.

    Handlers can only be set from the main thread; elsewhere (a notebook's worker thread) this does nothing.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.first_at = 0.0
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self.first_at = signum, now
            log.warning(
                "%s: finishing this optimizer step and writing a checkpoint; send it again to abort at once",
                signal.Signals(signum).name,
            )
            return
        if launched_by_agent() and now - self.first_at < REPEAT_WINDOW_S:
            return  # the launcher forwarding the same request
        self.__exit__()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def requested(self, accelerator) -> int | None:
        """The signal that asked this process, or any process, to stop; None to go on (called after every step)."""
        if accelerator.num_processes == 1:
            return self.signum
        mine = float(self.signum or 0)
        signums = accelerator.gather(torch.tensor([mine], device=accelerator.device))
        asked = [int(s) for s in signums.tolist() if s]
        return asked[0] if asked else None
