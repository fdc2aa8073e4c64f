"""What a result was produced on: interpreter, library versions, processor, threads and accelerator.

Numbers depend on it: CPU kernels pick their instruction set by processor and split sums by thread
count (the demo's table moves by a few test images between machines), and a timing means nothing
without the GPU's name. Every pipeline and stage run carries it as ``ltscale.env.*`` tags, and the
tools under ``tools/`` write the same record into their results files.
"""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path
from typing import Any

import torch

from ltscale.dist.runtime import usable_cpus
from ltscale.tracking.provenance import code_version

TAG_PREFIX = "ltscale.env."


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The processor's marketing name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runtime_environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """The record; ``device`` adds the GPU's name, compute capability and memory when it is a CUDA device."""
    device = torch.device(device) if device is not None else None
    env: dict[str, Any] = {
        "code_version": code_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu": cpu_model(),
        "cpu_count": usable_cpus(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device) if device is not None else None,
    }
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        env.update(gpu=props.name, gpu_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count())
    return env


def environment_tags(env: dict[str, Any]) -> dict[str, str]:
    """``env`` as MLflow tags (``ltscale.env.<key>``); unset entries and the code version (tagged on its own) left out."""
    return {f"{TAG_PREFIX}{key}": str(value) for key, value in env.items() if value is not None and key != "code_version"}
