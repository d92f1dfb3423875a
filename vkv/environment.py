# SPDX-License-Identifier: Apache-2.0
"""What a measurement was taken on: the date, the CPU and GPU, and the versions (bench/ and `vkv demo` record it)."""

from __future__ import annotations

import datetime
import platform
from importlib import metadata

import torch


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict:
    """Date, GPU (or None; read from its properties, which makes no context), CPU and versions."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{name: version(name) for name in ("triton", "transformers", "cuda-python", "cuda-bindings", "vkv")},
        "cpu": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {"gpu": props.name, "sms": props.multi_processor_count, "cuda": torch.version.cuda}
    else:
        env["gpu"] = None
    return env
