"""The global adapter on disk, in PEFT's own format, written from numpy tensors.

A directory holds ``adapter_config.json`` (a LoRA ``PeftConfig``) and
``adapter_model.safetensors`` (tensors keyed as ``get_peft_model_state_dict`` names them), so
``peft.PeftModel.from_pretrained(base_model, directory)`` loads the federation's result with no
fedsec code. Written without importing torch or peft: the server only holds numpy arrays.
Writes go to a temporary file first and are renamed, so a crash never leaves half an adapter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fl_core.errors import AdapterFormatError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class AdapterConfig:
    """The LoRA hyper-parameters PEFT needs to rebuild the adapter around a base model."""

    r: int
    lora_alpha: int
    target_modules: tuple[str, ...]
    lora_dropout: float = 0.0
    base_model_name_or_path: str | None = None
    #: True when the adapted layers store their weight transposed (GPT-2's Conv1D).
    fan_in_fan_out: bool = False

    def to_peft_json(self) -> dict[str, object]:
        # Keys not given here take PEFT's LoraConfig defaults when it loads the file.
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": sorted(self.target_modules),
            "bias": "none",
            "fan_in_fan_out": self.fan_in_fan_out,
            "inference_mode": True,
            "base_model_name_or_path": self.base_model_name_or_path,
        }


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_adapter(
    directory: str | Path, tensors: Mapping[str, np.ndarray], config: AdapterConfig
) -> None:
    """Write ``tensors`` (all LoRA A and B matrices, float32) as a PEFT adapter directory."""
    out = Path(directory)
    if not tensors:
        raise AdapterFormatError("refusing to save an adapter with no tensors")
    for name, value in tensors.items():
        if ".lora_A." not in name and ".lora_B." not in name:
            raise AdapterFormatError(f"{name!r} is not a LoRA A/B tensor name")
        if value.dtype != np.float32:
            raise AdapterFormatError(f"tensor {name!r} has dtype {value.dtype}, need float32")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, out / WEIGHTS_FILE)
    _write_text_atomic(out / CONFIG_FILE, json.dumps(config.to_peft_json(), indent=2))


def load_adapter(directory: str | Path) -> tuple[dict[str, np.ndarray], AdapterConfig]:
    """Read a PEFT LoRA adapter directory (ours or one PEFT wrote) back into numpy."""
    src = Path(directory)
    config_path, weights_path = src / CONFIG_FILE, src / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterFormatError(f"{src}: need both {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
        if raw.get("peft_type") != "LORA":
            raise AdapterFormatError(
                f"{config_path}: peft_type is {raw.get('peft_type')!r}, not LORA"
            )
        if not isinstance(raw.get("target_modules"), list):
            raise AdapterFormatError(
                f"{config_path}: target_modules must be a list of module names (a regex string "
                "cannot be mapped back to the named layout)"
            )
        config = AdapterConfig(
            r=int(raw["r"]),
            lora_alpha=int(raw["lora_alpha"]),
            target_modules=tuple(sorted(raw["target_modules"])),
            lora_dropout=float(raw.get("lora_dropout", 0.0)),
            base_model_name_or_path=raw.get("base_model_name_or_path"),
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        if isinstance(exc, AdapterFormatError):
            raise
        raise AdapterFormatError(f"{config_path}: not a LoRA adapter config: {exc}") from exc
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise AdapterFormatError(f"{weights_path}: unreadable safetensors file: {exc}") from exc
    return tensors, config
