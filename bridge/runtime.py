"""Where a run executes: its processes under `accelerate launch`, its device and the encoder's fast path.

Not here: the models themselves (vision.py, model.py) or the training loop (training/align.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import PartialState


def cpu_only() -> bool:
    """No GPU here: what accelerate must be told (`Accelerator(cpu=...)`) for gloo multi-processing."""
    return not torch.cuda.is_available()


def default_device() -> str:
    """Where a run goes unless told: a CUDA GPU, then a Mac's GPU (MPS), then the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def processes() -> PartialState:
    """accelerate's state of this run: one process, or N under `accelerate launch`.

    Every caller goes through here, because the first construction decides for the whole process. On a
    machine without a GPU, accelerate is told so; it then joins the N processes of
    `accelerate launch --multi_gpu --num_processes N` with gloo instead of running N unrelated copies.
    """
    return PartialState(cpu=cpu_only())


@dataclass(frozen=True)
class EncodeSettings:
    """How the frozen encoder runs when embedding many images (indexing, filling the feature cache)."""

    device: torch.device
    dtype: torch.dtype
    compile: bool  # torch.compile the encoder: +19% on an H100 (benchmarks/RESULTS.md), after a minute of compiling
    batch_size: int
    gpu_decode: bool  # decode JPEGs with nvJPEG on the GPU (decoding.py), other files on the CPU

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


# int8: the encoder's Linear layers dynamically quantised (torch.ao), a CPU precision; qint8 marks it.
PRECISIONS = {
    "auto": None,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "int8": torch.qint8,
}


def encode_settings(
    device: str | None = None,
    precision: str = "auto",
    compile: bool = False,
    batch_size: int | None = None,
    gpu_decode: bool | None = None,
) -> EncodeSettings:
    """The fastest way to run the encoder here, unless told otherwise.

    The device: `default_device()`. On a GPU: bfloat16 (float16 where the card lacks it), batches of 256,
    JPEGs decoded on the GPU. On a Mac's GPU (MPS): float16, batches of 64, JPEGs decoded on the CPU. On a
    CPU: float32 (bfloat16 is faster on CPUs with AVX-512 BF16 or AMX but moves features by ~1e-2, so
    it is asked for, never assumed), batches of 32. SDPA attention in both cases: transformers' default
    for DINOv2, which FrozenEncoder keeps.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    where = torch.device(device or default_device())
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no GPU; use --device cpu")
    if where.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but torch sees no Apple GPU (MPS); use --device cpu")
    on_gpu = where.type == "cuda"
    if precision == "int8" and where.type != "cpu":
        raise ValueError("precision int8 (dynamic quantisation) runs on a CPU only; use --device cpu or bf16")
    dtype = PRECISIONS[precision]
    if dtype is None:
        dtype = (
            (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if on_gpu else torch.float32
        )
        if where.type == "mps":  # float16 on every Apple GPU; bfloat16 needs macOS 14
            dtype = torch.float16
    return EncodeSettings(
        device=where,
        dtype=dtype,
        compile=compile,
        batch_size=batch_size or (256 if on_gpu else 64 if where.type == "mps" else 32),
        gpu_decode=on_gpu if gpu_decode is None else gpu_decode and on_gpu,
    )
