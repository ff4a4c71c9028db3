"""Where a number came from: the commit and the machine, recorded next to every benchmark, report and training
summary. Standard library only (torch and diffusers versions are read when they are installed)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def git_commit() -> str:
    """The checkout's commit id (40 hex digits, with ``-dirty`` when tracked files are modified), or ``unknown``
    outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=here, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=here,
            timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(device: Any = None) -> dict[str, Any]:
    """Host, platform, CPU, Python/torch/diffusers versions, torch threads, and the GPU when CUDA is present.

    ``device`` (a ``torch.device`` or string), when given, is recorded as ``device`` and names the GPU asked about.
    """
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return info
    info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover - diffusers is a dependency
        pass
    if device is not None:
        info["device"] = str(device)
    dev = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (dev is None or dev.type == "cuda"):
        info["gpu"] = torch.cuda.get_device_name(dev if dev is not None and dev.index is not None else 0)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


__all__ = ["git_commit", "machine_info"]
