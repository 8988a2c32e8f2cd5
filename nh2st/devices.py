"""Device selection shared by both stages (`--device auto|cpu|cuda|cuda:N`)."""

import os
import re

import torch

from nh2st.errors import NH2STError


def cpu_count() -> int:
    """Cores this process may use (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`; NH2STError for anything else."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", device or "")
    if match is None:
        raise NH2STError(f"--device {device!r} is not understood; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise NH2STError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise NH2STError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s); "
                         f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)
