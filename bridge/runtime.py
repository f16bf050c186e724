"""Where a run executes: its processes under `accelerate launch`, its device and the encoder's fast path.

Not here: the models themselves (vision.py, model.py) or the training loop (training/align.py).
"""

from __future__ import annotations

import torch
from accelerate import PartialState


def cpu_only() -> bool:
    return not torch.cuda.is_available()


def processes() -> PartialState:
    """accelerate's state of this run: one process, or N under `accelerate launch`.

    Every caller goes through here, because the first construction decides for the whole process. On a
    machine without a GPU, accelerate is told so; it then joins the N processes of
    `accelerate launch --multi_gpu --num_processes N` with gloo instead of running N unrelated copies.
    """
    return PartialState(cpu=cpu_only())
