"""A test callback that SIGKILLs its own process mid-step, as a crash or an OOM-killer would."""

import os
import signal

import lightning as L


class KillAt(L.Callback):
    """After step ``step``'s checkpoint is written, kill the process with SIGKILL while the next
    step's gradients wait for the optimizer (no cleanup, no final checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
