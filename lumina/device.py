"""Devices and precision: one rule for every stage, and the one place that makes a random generator."""
import contextlib

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


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


def autocast(device, dtype):
    """Mixed precision for forward passes in `dtype`; does nothing in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def seeded_generator(seed, device="cpu"):
    """A torch.Generator on `device`, seeded: the only one the code makes. Training draws its
    windows with a CPU one (the data lives on the CPU); sampling needs none (engine.gumbel)."""
    return torch.Generator(device).manual_seed(seed)


def cpu_has_bf16():
    """AMX or AVX512-BF16 makes bf16 matmuls several times faster than fp32 (Linux only); without
    them bf16 is emulated, about 1 GFLOP/s against 180 for fp32 on an AVX2-only EPYC."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def gpu_dtype(device):
    """(dtype, why) for auto on a GPU: bf16 autocast where the GPU has it, else fp16 (training adds
    a GradScaler); MPS stays in float32, as nothing faster was measured there."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "this GPU computes in bf16 natively"
        return torch.float16, "this GPU lacks bf16; fp16 with loss scaling"
    return torch.float32, "mixed precision was not measured faster on MPS"


def dtype_line(dtype, asked, why=""):
    """The one log line that says which precision a stage runs in: chosen, asked, and why."""
    name = str(dtype).replace("torch.", "")
    return f"dtype {name} (asked {asked}" + (f": {why})" if asked == "auto" else ")")


# Generation on a CPU with native bf16 (AMX), with the weights cast to bf16 once: one row at a time
# ran at 0.69-0.80x of float32 at widths 128-512, and 64 rows at once at 1.38-1.91x; 16 rows were
# 0.97x at width 128 and faster above (benchmarks/README.md, "Precision for generation"). So bf16
# pays for a stage that runs many rows at once.
BF16_MIN_ROWS = 32


def generation_dtype(asked, device, rows):
    """(dtype, why) that ChatAI.py and serve.py generate in, their weights cast to it once (a chat
    stage never trains, so it keeps no float32 copy): what `asked` names, or for auto what this
    device runs fastest for a stage that steps `rows` rows at once."""
    if asked != "auto":
        return DTYPES[asked], ""
    if device.type != "cpu":
        return gpu_dtype(device)
    if not cpu_has_bf16():
        return torch.float32, "no AVX512-BF16 or AMX in this CPU's flags: bf16 would be emulated, far slower"
    if rows >= BF16_MIN_ROWS:
        return torch.bfloat16, f"this CPU has native bf16, which generated faster than float32 for {rows} rows at once"
    return torch.float32, (f"this CPU has native bf16, but for {rows} row(s) at once float32 generated faster "
                           f"(bf16 pays from {BF16_MIN_ROWS})")
