"""Devices and precision: one rule for every stage, and the one place that makes a random generator."""
import contextlib
import hashlib
import json
import os
import platform

import torch

from lumina.data import atomic_write

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


def dtype_name(dtype):
    """torch.bfloat16 -> "bfloat16": how configs, checkpoints and logs name a precision."""
    return str(dtype).replace("torch.", "")


def dtype_line(dtype, asked, why=""):
    """The one log line that says which precision a stage runs in: chosen, asked, and why."""
    return f"dtype {dtype_name(dtype)} (asked {asked}" + (f": {why})" if asked == "auto" else ")")


# ----------------------------------------------------------------------------------------------
# The precision policy of every stage: for auto, time the candidates on the actual model and work,
# keep the faster, and remember it per machine, model shape and torch version
# ----------------------------------------------------------------------------------------------
# A rule from CPU flags was wrong: on an EPYC with avx512_bf16 (no AMX), bf16 generated at 0.36x of
# float32 for one row where an AMX Xeon had measured 0.69-0.80x (issue 30). Only a trial on the
# machine itself knows, and a few seconds of it, once, is cheap.
CACHE_FILE = "precision.json"
EMULATED = "no AVX512-BF16 or AMX in this CPU's flags: bf16 would be emulated, far slower (not timed)"


def cache_path():
    """The file that remembers trials: $LUMINA_CACHE_DIR (tests point it elsewhere), else the user's
    cache folder ($XDG_CACHE_HOME, default ~/.cache) /lumina."""
    folder = os.environ.get("LUMINA_CACHE_DIR")
    if not folder:
        folder = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                              "lumina")
    return os.path.join(folder, CACHE_FILE)


def cpu_name(cpuinfo):
    """The processor as /proc/cpuinfo's text describes it: its name, family, model and a digest of
    its flags. The name alone is not enough: a VM's "AMD EPYC" may be a Zen 3 without bf16 or a
    Zen 4 with it, which generate at different speeds in different precisions. None if the text
    names no processor."""
    first = dict(line.split(":", 1) for line in cpuinfo.split("\n\n")[0].splitlines() if ":" in line)
    first = {key.strip(): value.strip() for key, value in first.items()}
    if "model name" not in first:
        return None
    flags = hashlib.sha256(first.get("flags", "").encode()).hexdigest()[:8]
    return f"{first['model name']} (family {first.get('cpu family', '?')}, model {first.get('model', '?')}, flags {flags})"


def machine_name():
    """What tells this machine's speed apart: the processor, its cores and the threads torch uses."""
    name = None
    try:
        with open("/proc/cpuinfo") as f:
            name = cpu_name(f.read())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    return f"{platform.node()} | {name} | {os.cpu_count()} cores | {torch.get_num_threads()} threads"


def trial_key(device, model_shape, work):
    """The cache key of a trial: machine, device, torch version, model shape (a dict) and the work timed."""
    return json.dumps({"machine": machine_name(), "device": str(device), "torch": torch.__version__,
                       "model": model_shape, "work": work}, sort_keys=True)


def read_trials(path):
    """{key: record} from the cache file; a missing, unreadable or corrupt file is an empty cache
    (the next trial rewrites it)."""
    try:
        with open(path, encoding="utf-8") as f:
            trials = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(trials, dict):
        return {}
    return {key: record for key, record in trials.items() if isinstance(record, dict) and "chosen" in record}


def remember_trial(path, key, record):
    trials = {**read_trials(path), key: record}

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(trials, f, indent=1)
    try:
        atomic_write(path, write)
    except OSError:  # a read-only home folder: the choice still stands, it is timed again next start
        pass


def remembered(key, measure, valid=lambda record: True):
    """(record, cached): the cache's record for key when it holds a valid one, else measure()'s (a
    dict with "chosen"), which is stored for the next start."""
    path = cache_path()
    record = read_trials(path).get(key)
    if record is not None and valid(record):
        return record, True
    record = measure()
    remember_trial(path, key, record)
    return record, False


def measured_choice(candidates, trial, key):
    """(chosen, {candidate: seconds per workload}, cached): the candidate least behind the fastest
    at any of the workloads that trial(candidate) times (a list of seconds each), from the cache
    when this key was timed before."""
    def measure():
        times = {name: list(trial(name)) for name in candidates}
        best = [min(seconds) for seconds in zip(*times.values())]
        return {"chosen": min(candidates, key=lambda name: max(t / b for t, b in zip(times[name], best))),
                "times": times}
    record, cached = remembered(key, measure, lambda record: record["chosen"] in candidates and
                                set(record.get("times", ())) == set(candidates))
    return record["chosen"], record["times"], cached


def timings_line(what, times, cached):
    """What the log line says: "<what> took 1/2 ms in float32, 3/4 ms in bfloat16" for two workloads."""
    return f"{what} took " + ", ".join("/".join(f"{t * 1000:.3g}" for t in seconds) + f" ms in {name}"
                                       for name, seconds in times.items()) + (" (cached)" if cached else "")


CPU_CANDIDATES = ("float32", "bfloat16")  # the precisions auto times on a CPU with native bf16


def timed_dtype(asked, device, trial, key, what):
    """(dtype, why): the precision of every stage. What `asked` names; for auto on a GPU its native
    mixed precision (gpu_dtype); on a CPU whose flags lack bf16, float32 (bf16 is emulated there,
    ~100x slower: not worth timing); else the faster of float32 and bfloat16 by trial(name), a list
    of seconds per workload (cached under key; `what` names the unit timed in the log line)."""
    if asked != "auto":
        return DTYPES[asked], ""
    if device.type != "cpu":
        return gpu_dtype(device)
    if not cpu_has_bf16():
        return torch.float32, EMULATED
    chosen, times, cached = measured_choice(CPU_CANDIDATES, trial, key)
    return DTYPES[chosen], timings_line(what, times, cached)
