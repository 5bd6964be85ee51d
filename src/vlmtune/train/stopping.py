"""Stopping: SIGINT/SIGTERM while training finish the step, save a checkpoint and raise
:class:`vlmtune.errors.Interrupted`; a run of non-finite losses raises ``Diverged``. Every
process stops (or skips a step) at the same step: :func:`step_values` agrees on it."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import torch

from vlmtune.distributed import all_reduce_sum

log = logging.getLogger("vlmtune")


class StopRequest:
    """SIGINT/SIGTERM while training: remember the first signal; the loop finishes the
    current step, saves a checkpoint and raises :class:`Interrupted`. Later signals are
    only noted (torchrun forwards a terminal's Ctrl-C to the workers a second time);
    SIGKILL still stops at once, and ``--resume`` continues from the last checkpoint."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.signum:
            self.signum = signum
            log.warning("%s: finishing this step, then saving a checkpoint", signal.Signals(signum).name)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def __exit__(self, *exc: object) -> None:
        self.restore()


def interrupted_message(signum: int, where: str, ckpt_dir: Path, out: Path) -> str:
    return (
        f"{signal.Signals(signum).name} at {where}: checkpoint saved in {ckpt_dir / 'last'}; "
        f"continue with the same command and --resume (--output-dir {out})"
    )


def step_values(
    loss: torch.Tensor, terms: dict[str, torch.Tensor], keys: list[str], signum: int, device: torch.device
) -> tuple[bool, bool, dict[str, float]]:
    """(any process's loss is not finite, any process got a stop signal, the values to
    log): ``loss`` and the ``keys`` terms averaged over the processes that have them,
    diagnostics ('diag/...') from this process. One small all_reduce with several
    processes; with one, the local values as they are."""
    one, zero = torch.ones((), device=device), torch.zeros((), device=device)
    loss = loss.detach().float().reshape(()).to(device)
    row = [(~torch.isfinite(loss)).float(), one if signum else zero, torch.nan_to_num(loss), one]
    for k in keys:
        row += [terms[k].detach().float().reshape(()), one] if k in terms else [zero, zero]
    total = all_reduce_sum(torch.stack(row)).tolist()
    values = {"loss": total[2] / total[3]}
    for i, k in enumerate(keys):
        if total[5 + 2 * i]:
            values[k] = total[4 + 2 * i] / total[5 + 2 * i]
    values.update({k: float(v.detach()) for k, v in terms.items() if k.startswith("diag/")})
    return total[0] > 0, total[1] > 0, values


def any_stop_signal(signum: int, device: torch.device) -> bool:
    """Whether any process got a stop signal (``signum`` is this one's); a collective."""
    return step_values(torch.zeros(()), {}, [], signum, device)[1]


def diverged_message(in_row: int, in_all: int, where: str, ckpt_dir: Path) -> str:
    """Why a run stopped after ``train.max_bad_steps`` non-finite losses in a row, and what to try."""
    return (
        f"loss was NaN or infinite for {in_row} steps in a row ({where}; {in_all} in all); stopped with a checkpoint "
        f"in {ckpt_dir / 'last'} holding the weights from before them. Lower optim.lr, set optim.grad_clip, or check "
        f"the data"
    )
