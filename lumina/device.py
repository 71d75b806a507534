"""Devices: one rule for every stage."""
import torch


def pick_device(name, local_rank=0):
    """auto: CUDA, then Apple's MPS, then the CPU. A named device that is not there is an error,
    never a silent fallback. Under torchrun, plain "cuda" means this process's own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind = name.split(":")[0]
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if kind not in available:
        raise ValueError(f"device must be auto, cuda, cuda:N, mps or cpu, got {name!r}")
    if not available[kind]:
        raise ValueError(f"device {name!r} is not available on this machine; use --device=auto or cpu")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


