"""Where training runs and in which precision: ``device``, ``precision`` and ``quantization``.

``auto`` picks CUDA, then Apple's MPS, then the CPU. Precision is autocast: the LoRA weights
(the only trained tensors, and the only ones that leave a client) stay float32 whatever the
base computes in, so updates are float32 on every device. ``auto`` is bf16 on a CUDA GPU that
supports it (fp16 with a gradient scaler on one that does not) and fp32 elsewhere.

QLoRA (``quantization = "4bit"``) loads the base in 4-bit NF4 through ``bitsandbytes``: CUDA
only, and an optional extra (``pip install 'fedsec[qlora]'``). Every request that this machine
cannot honour is refused with one sentence that says why, never silently downgraded.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch

from fl_core.errors import FLError

DeviceName = Literal["auto", "cpu", "cuda", "mps"]
PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]
QuantizationName = Literal["none", "4bit"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(FLError, ValueError):
    """A device, precision or quantization this machine (or this torch build) cannot provide."""


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast: torch.dtype | None  # None: plain fp32
    quantization: QuantizationName = "none"

    @property
    def precision(self) -> str:
        names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
        return "fp32" if self.autocast is None else names[self.autocast]

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling (bf16 has fp32's exponent range)."""
        return self.autocast is torch.float16 and self.device.type == "cuda"

    def describe(self) -> dict[str, str]:
        return {
            "device": str(self.device),
            "precision": self.precision,
            "quantization": self.quantization,
        }


CPU = Runtime(torch.device("cpu"), None)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_runtime(
    device: DeviceName = "auto",
    precision: PrecisionName = "auto",
    quantization: QuantizationName = "none",
) -> Runtime:
    """The concrete runtime for the requested settings, or :class:`DeviceError`."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no visible GPU"
        raise DeviceError(f"device cuda: torch sees no CUDA device ({build})")
    elif device == "mps" and not _mps_available():
        raise DeviceError("device mps: Apple's Metal backend is not available on this machine")
    dtype: torch.dtype | None
    if precision == "auto":
        if device == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = None
    elif precision == "fp32":
        dtype = None
    else:
        dtype = _DTYPES[precision]
        if precision == "fp16" and device == "cpu":
            raise DeviceError("precision fp16 needs a GPU (cuda or mps); use bf16 or fp32 on cpu")
        if precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError("precision bf16: this GPU has no bf16 support; use fp16 or fp32")
    if quantization == "4bit":
        if device != "cuda":
            raise DeviceError(
                f"quantization 4bit (QLoRA) needs a CUDA GPU; this run is on {device}"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise DeviceError(
                "quantization 4bit (QLoRA) needs bitsandbytes: pip install 'fedsec[qlora]'"
            )
    return Runtime(torch.device(device), dtype, quantization)


def autocast(runtime: Runtime) -> torch.autocast:
    """The autocast context of ``runtime`` (disabled for fp32)."""
    return torch.autocast(
        device_type=runtime.device.type,
        dtype=runtime.autocast or torch.float32,
        enabled=runtime.autocast is not None,
    )
