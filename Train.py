"""Train.py: train LuminaAI's character-level transformer chatbot from scratch.

Reads  oasst1_data/train.jsonl and validation.jsonl (made by `python Dataset_download.py`), or any
       file or folder given as --data: chat JSONL ({"messages": [...]}), OASST message rows
       ({"text", "role", "parent_id"...}), text with <|user|> / <|bot|> line markers, or plain prose.
Writes, in out_dir:
       Model.pth         the best model so far (lowest val loss), ready for ChatAI.py and fine_tune.py
       train_state.pth   a resumable checkpoint (optimizer, step, RNG and sampler state)
       train_metrics.jsonl  one line per log interval and evaluation
       train_loss.png    the loss curves, when matplotlib is installed

Run:
  python Train.py                                   # the preset for your device, about 15 minutes
  python Train.py --max_minutes=1 --num_layers=2    # a tiny CPU example
  python Train.py --resume                          # continue after Ctrl-C, SIGTERM or a crash
  torchrun --nproc_per_node=4 Train.py --grad_accum=4   # 4 GPUs on one machine (DistributedDataParallel)
  python Train.py --help                            # every key, with its comment and default
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import model as M
from config import ConfigError, apply_overrides, check_rules, parse_cli

CONFIG = {
    # --- data ---
    "data": "oasst1_data",         # folder from Dataset_download.py, or your own file/folder (see docstring)
    "val_fraction": 0.05,          # share of documents held out when the data has no validation file (0-0.5)
    "assistant_only_loss": False,  # True: learn only assistant turns and their <|end|>; prose always trains
    # --- model (None = the device preset, see PRESETS) ---
    "hidden_size": None,           # width of the residual stream; 128-1024
    "num_layers": None,            # transformer blocks; 2-12
    "nhead": None,                 # attention heads; hidden_size / nhead of 32-128 works well
    "seq_length": None,            # context window in characters; 64-1024
    "dropout": 0.0,                # 0 for runs shorter than an epoch; 0.1 once val loss drifts above train loss
    # --- optimization ---
    "optimizer": "muon",           # muon: Muon for the blocks' weight matrices, AdamW for the rest; or adamw for all
    "batch_size": None,            # sequences per micro-batch, per process
    "grad_accum": 1,               # micro-batches per optimizer step, summed over all processes
    "learning_rate": None,         # peak learning rate (Muon's step is scaled to AdamW's, so one rate serves both)
    "min_lr_ratio": 0.0,           # the cosine decays to learning_rate * this; 0 = all the way down
    "warmup_ratio": 0.05,          # share of training spent warming up (0-0.5)
    "weight_decay": 0.1,           # AdamW decay, applied to weight matrices only
    "beta2": 0.99,                 # AdamW beta2; 0.99 suits small batches
    "grad_clip": 1.0,              # max gradient norm; 0 turns clipping off
    "label_smoothing": 0.0,        # 0-0.2; off: it moves probability onto wrong characters, which bits/char punishes
    "max_iters": 20000,            # optimizer steps; training ends at max_iters or max_minutes, whichever first
    "max_minutes": 15.0,           # wall-clock budget including compilation; 0 = no budget
    # --- evaluation and logging ---
    "eval_interval": 250,          # steps between val evaluations; Model.pth is saved when val improves
    "eval_windows": 64,            # val windows per evaluation (fixed, evenly spaced, so evals compare)
    "log_interval": 50,            # steps between log lines
    "probe_chars": 80,             # length of the probe replies shown at each evaluation; 0 = none
    # --- checkpointing ---
    "out_dir": ".",                # where Model.pth, train_state.pth, metrics and the cache go
    "checkpoint_interval": 500,    # steps between resumable saves (also saved at the end and on Ctrl-C)
    # --- system ---
    "device": "auto",              # auto (cuda, then mps, then cpu), cuda, cuda:1, mps or cpu
    "dtype": "auto",               # auto, float32, bfloat16 or float16 (autocast; float16 adds a GradScaler)
    "compile": "auto",             # torch.compile the model: auto (by the rule in choose_compile), true or false
    "threads": 0,                  # CPU threads; 0 = one per physical core
    "seed": 1337,                  # same seed, same data and same losses
}
# Keys that default to None take these types on the command line.
TYPES = {"hidden_size": int, "num_layers": int, "nhead": int, "seq_length": int,
         "batch_size": int, "learning_rate": float}
POSITIVE = ("hidden_size", "num_layers", "nhead", "seq_length", "batch_size", "grad_accum", "max_iters",
            "eval_interval", "eval_windows", "log_interval", "checkpoint_interval")
RULES = {"val_fraction": (0.0, 0.5), "warmup_ratio": (0.0, 0.5), "min_lr_ratio": (0.0, 1.0), "dropout": (0.0, 0.9),
         "label_smoothing": (0.0, 0.5), "grad_clip": (0.0, math.inf), "max_minutes": (0.0, math.inf),
         "weight_decay": (0.0, math.inf), "beta2": (0.0, 0.9999), "learning_rate": (1e-9, 10.0),
         "probe_chars": (0, 10000), "threads": (0, 1024), "dtype": ("auto", "float32", "bfloat16", "float16"),
         "optimizer": ("adamw", "muon"), "compile": ("auto", "true", "false"),
         **{key: (1, math.inf) for key in POSITIVE}}

# Model shapes and batch sizes that suit each device; any key set above wins over the preset.
# CPU: on 2 cores a 10-15 minute run is short, and many small steps beat a wider model. In 3-minute
# runs on the real text (benchmarks/README.md, "Choosing the CPU preset") width 256 / batch 32
# reached 3.84 bits/char, width 128 / batch 32 3.22, and width 128 / batch 8 2.47. In 10-minute
# runs context 256 / batch 4 matched context 128 / batch 8 (1.949 and 1.948) and holds twice the
# chat history. With Muon (the default optimizer) batch 8 at 6e-3 learned most in 5 minutes
# ("Optimizer: Muon"); with --optimizer=adamw use batch 4 at 3e-3.
# GPU: a larger model for the same 15 minutes (not measured: no GPU yet).
PRESETS = {
    "cpu": dict(hidden_size=128, num_layers=4, nhead=4, seq_length=256, batch_size=8, learning_rate=6e-3),
    "gpu": dict(hidden_size=512, num_layers=8, nhead=8, seq_length=512, batch_size=64, learning_rate=1e-3),
}
PROBES = ["Hello! How are you today?", "What is the capital of France?", "Give me a tip for learning Python."]
END_PROBES = 8          # held-out prompts the end-of-turn rate samples (chat data only)
END_PROBE_CHARS = 2000  # a reply still open after this many characters has not ended its turn
END_WEIGHT = 0.1        # bits/char of val that a fine-tune's model selection trades for ending every reply
CACHE_VERSION = 3  # 3: the cache also holds the held-out prompts
COMPILE_MIN_MINUTES = 5.0  # compile=auto on a GPU: a budget at least this long (compiling costs about 1 min)
INTERRUPTED = 130  # exit code after Ctrl-C, as shells report it


# ----------------------------------------------------------------------------------------------
# Setup: device, precision and processes, decided once before the loop
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world: int = 1
    is_main: bool = True  # rank 0: the one process that logs and saves

    def autocast(self):
        """Mixed precision for forward passes; does nothing in float32."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)


def cpu_has_bf16():
    """AMX or AVX512-BF16 makes bf16 matmuls several times faster than fp32 (Linux only); without
    them bf16 is emulated, about 1 GFLOP/s against 180 for fp32 on an AVX2-only EPYC."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_dtype(name, device):
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name != "auto":
        return choices[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # a CPU starts in float32; choose_dtype() may measure bf16 against it


DTYPE_TRIAL_STEPS = 3  # timed training steps per precision when dtype=auto must measure (after one warm-up)


def choose_dtype(net, config, runtime, log):
    """dtype=auto on a CPU whose flags promise fast bf16: time a few real training steps of this
    model in float32 and in bf16 autocast, and keep the faster. A matmul peak says little when the
    model is small enough for everything else to dominate (on an EPYC with avx512_bf16, bf16's
    matmul peak was 2.4x fp32's, yet training ran at 0.88x), so the decision is measured, on the
    actual model and batch, and logged. The trial steps' gradients are thrown away."""
    if config["dtype"] != "auto" or runtime.device.type != "cpu":
        return
    if runtime.world > 1:  # every process must train in the same precision, and timings differ
        log("dtype auto: float32 (several CPU processes; choose one with --dtype to use bf16)")
        return
    if not cpu_has_bf16():
        log("dtype auto: float32 (no AVX512-BF16 or AMX in this CPU's flags: bf16 would be emulated, far slower)")
        return
    x = torch.randint(net.config.vocab_size, (config["batch_size"], config["seq_length"]), generator=torch.Generator().manual_seed(0))
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        trial = dataclasses.replace(runtime, dtype=dtype)
        durations = []
        for _ in range(1 + DTYPE_TRIAL_STEPS):
            start = time.perf_counter()
            forward_backward(net, x, x, len(x), trial, torch.amp.GradScaler("cpu", enabled=False), config)
            durations.append(time.perf_counter() - start)
        times[dtype] = min(durations[1:])
    net.zero_grad(set_to_none=True)
    runtime.dtype = min(times, key=times.get)
    log(f"dtype auto: {str(runtime.dtype).replace('torch.', '')} (a training step took "
        + ", ".join(f"{t * 1000:.0f} ms in {str(d).replace('torch.', '')}" for d, t in times.items()) + ")")


def choose_compile(config, runtime, log):
    """compile=true or false is obeyed. auto compiles only where it was measured to pay: on a CPU,
    compiled steps of the CPU preset were no faster than eager ones (benchmarks/README.md, "When
    torch.compile pays"), so the 35-60 s of compiling never comes back; on a GPU, whose step is
    mostly kernel launches that compiling fuses, when the budget leaves COMPILE_MIN_MINUTES to win
    it back."""
    if config["compile"] != "auto":
        return config["compile"] == "true"
    budget = config["max_minutes"]
    chosen = runtime.device.type == "cuda" and (not budget or budget >= COMPILE_MIN_MINUTES)
    length = f"a {budget:g}-minute budget" if budget else "no time budget"
    why = {"cuda": f"{length} {'leaves time to win back' if chosen else 'is too short to win back'} a minute of compiling",
           "cpu": "compiled steps were measured no faster than eager ones on CPUs"}.get(runtime.device.type, "not measured here")
    log(f"compile auto: {'on' if chosen else 'off'} ({why})")
    return chosen


def setup_runtime(config):
    """One process, or one of torchrun's: nccl between GPUs, gloo between CPU processes."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        device = M.pick_device(config["device"], int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if config["grad_accum"] % world:
        raise SystemExit(f"error: grad_accum ({config['grad_accum']}) must be a multiple of the number of processes "
                         f"({world}) so the effective batch stays the same; use --grad_accum={world}")
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device, pick_dtype(config["dtype"], device), rank, world, rank == 0)


def resolve_config(config, argv, state, device):
    """The run's config: on --resume the saved run's, with this command line on top; then the
    device preset fills the keys left at None."""
    try:
        if state:  # a run saved before the optimizer key existed used AdamW
            config = apply_overrides({**CONFIG, "optimizer": "adamw", **state["config"]},
                                     [a for a in argv if a != "--resume"], TYPES)
        preset = PRESETS["gpu" if device.type == "cuda" else "cpu"]
        return check_rules({**config, **{k: v for k, v in preset.items() if config.get(k) is None}}, RULES)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


# ----------------------------------------------------------------------------------------------
# Setup: data, as ids, cached on disk
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Data:
    train: torch.Tensor        # int32 ids
    train_mask: torch.Tensor   # bool: loss counts at this target
    val: torch.Tensor
    val_mask: torch.Tensor
    vocab: M.Vocab
    new_chars: dict            # characters absent from base_vocab -> count
    problems: list             # "file:line: reason" for every skipped line
    val_prompts: list = dataclasses.field(default_factory=list)  # held-out chats' openings, for the end-of-turn rate


def cache_key(path, val_fraction, assistant_only, seed, base_vocab):
    """Everything the encoded arrays depend on: each file's name and content, and the settings."""
    if not os.path.exists(path):
        return "none"  # training_documents explains the missing path
    train_files, val_files = data.split_files(path)
    files = [(os.path.basename(f), data.sha256_file(f)) for f in train_files + val_files]
    settings = [CACHE_VERSION, files, len(train_files), val_fraction, assistant_only, seed, base_vocab and base_vocab.chars]
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]


def encode_data(path, val_fraction, assistant_only, seed, base_vocab):
    """Read and split the documents (data.py), build the vocabulary and encode them (model.py), as
    the numpy arrays the cache holds."""
    problems = []
    train_docs, val_docs = data.training_documents(path, val_fraction, seed, problems)
    counts = data.document_chars(train_docs + val_docs)
    vocab = base_vocab.extended(sorted(counts)) if base_vocab else M.Vocab(sorted(counts))
    new_chars = {c: counts[c] for c in vocab.chars[len(base_vocab.chars):]} if base_vocab else {}
    train, train_mask = M.encode_documents(train_docs, vocab, assistant_only)
    val, val_mask = M.encode_documents(val_docs or train_docs, vocab, assistant_only)
    prompts = held_out_prompts(val_docs, vocab)
    return dict(train=train, train_mask=train_mask, val=val, val_mask=val_mask,
                prompts=np.array([i for p in prompts for i in p], dtype=np.int32),
                prompt_lengths=np.array([len(p) for p in prompts], dtype=np.int64),
                vocab=np.array(vocab.chars, dtype=str), new_chars=np.array(list(new_chars), dtype=str),
                new_counts=np.array(list(new_chars.values()), dtype=np.int64), problems=np.array(problems, dtype=str))


def held_out_prompts(documents, vocab, limit=END_PROBES):
    """The opening of up to `limit` held-out chats, up to their first assistant turn, rendered for
    a reply: the prompts on which the end-of-turn rate is measured."""
    prompts = []
    for kind, doc in documents:
        first_reply = next((i for i, m in enumerate(doc) if m["role"] == "assistant"), 0) if kind == "chat" else 0
        if first_reply and len(prompts) < limit:
            prompts.append(M.render_chat(doc[:first_reply], vocab, add_generation_prompt=True)[0])
    return prompts


def load_data(path, cache_dir, val_fraction, assistant_only, seed, base_vocab=None, log=print):
    """The training and validation ids, from the cache made from the same inputs when there is
    one. The vocabulary is base_vocab extended by any new characters, or built from the data."""
    cache = os.path.join(cache_dir, f"tokens-{cache_key(path, val_fraction, assistant_only, seed, base_vocab)}.npz")
    if os.path.exists(cache):
        log(f"data: reusing the encoded cache {cache}")
        with np.load(cache) as saved:
            arrays = dict(saved)
    else:
        arrays = encode_data(path, val_fraction, assistant_only, seed, base_vocab)
        data.atomic_write(cache, lambda tmp: np.savez(tmp, **arrays))
    ends = np.cumsum(arrays["prompt_lengths"]).tolist()
    prompts = [arrays["prompts"][end - n:end].tolist() for end, n in zip(ends, arrays["prompt_lengths"].tolist())]
    return Data(torch.from_numpy(arrays["train"]), torch.from_numpy(arrays["train_mask"]), torch.from_numpy(arrays["val"]),
                torch.from_numpy(arrays["val_mask"]), M.Vocab(arrays["vocab"].tolist()),
                dict(zip(arrays["new_chars"].tolist(), arrays["new_counts"].tolist())), arrays["problems"].tolist(), prompts)


def report_data(found, log):
    for problem in found.problems[:20]:
        log(f"skipped {problem}")
    if len(found.problems) > 20:
        log(f"... and {len(found.problems) - 20} more skipped lines")
    log(f"data: {len(found.train):,} train ids, {len(found.val):,} val ids, vocabulary {len(found.vocab)} "
        f"({len(found.problems)} lines skipped)")


def windows(ids, mask, starts, seq_length):
    """Inputs (n, T) and targets (n, T) for windows beginning at `starts`; masked targets are -1."""
    idx = starts[:, None] + torch.arange(seq_length + 1)  # (n, T+1)
    chunk = ids[idx].long()
    return chunk[:, :-1], chunk[:, 1:].masked_fill(~mask[idx[:, 1:]], -1)


def random_windows(ids, mask, n, seq_length, generator):
    """n training windows at random positions: every position is equally likely on every step."""
    seq_length = min(seq_length, len(ids) - 1)
    starts = torch.randint(len(ids) - seq_length, (n,), generator=generator)
    return windows(ids, mask, starts, seq_length)


# ----------------------------------------------------------------------------------------------
# Setup: optimizer and schedule
# ----------------------------------------------------------------------------------------------
def lr_at(progress, config):
    """Linear warmup, then cosine decay to min_lr_ratio * learning_rate, over progress in [0, 1]."""
    peak, warmup = config["learning_rate"], config["warmup_ratio"]
    if progress < warmup:
        return peak * (progress + 1e-3) / warmup
    decay = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    floor = peak * config["min_lr_ratio"]
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * decay))


def orthogonalize(g, steps=5):
    """The nearest semi-orthogonal matrix to each matrix of g (..., rows, cols), roughly: five
    Newton-Schulz iterations of the quintic x <- a x + (b A + c A^2) x with A = x x^T, whose
    coefficients push every singular value towards 1 fast (to 0.5-1.5, which trains as well as
    exactly 1). Run in g's own dtype: torch.optim.Muon always uses bf16, which CPUs without native
    bf16 emulate about 100x slower than fp32."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values at most 1: it converges
    tall = x.shape[-2] > x.shape[-1]
    x = x.mT if tall else x  # A = x x^T is then the smaller square
    for _ in range(steps):
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Momentum, orthogonalised (Keller Jordan's Muon): each 2-D weight moves by an orthogonalised
    Nesterov momentum, so every direction of the matrix learns at the same rate. The step is scaled
    by 0.2 sqrt(max(rows, cols)) to the size of AdamW's (Moonshot's rule), so it takes AdamW's
    learning rate and decoupled weight decay. Momentum warms up from 0.85 to 0.95 over the first
    300 steps, as in the speedruns: early gradients change fast, and a long memory of them slows
    the start (0.089 bits/char lower after 5 minutes, benchmarks/README.md)."""

    def __init__(self, params, lr, weight_decay, momentum=(0.85, 0.95), warmup_steps=300):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, parts=1,
                                      warmup_steps=warmup_steps, steps=0))

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for group in self.param_groups:  # a run saved before the warm-up existed keeps its constant momentum
            if isinstance(group["momentum"], float):
                group.update(momentum=(group["momentum"],) * 2, steps=0, warmup_steps=1)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            start, end = group["momentum"]
            momentum = start + (end - start) * min(1.0, group["steps"] / group["warmup_steps"])
            group["steps"] += 1  # kept in the group, so a resumed run goes on warming up where it was
            by_shape = {}  # matrices of one shape (the same layer in every block) go through together
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for shape, params in by_shape.items():
                bufs = [self.state[p].setdefault("momentum", torch.zeros_like(p)) for p in params]
                grads = [p.grad for p in params]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads)
                nesterov = torch.stack(torch._foreach_add(grads, bufs, alpha=momentum))
                # A fused matrix (q, k and v; gate and value) is orthogonalised part by part.
                parts = nesterov.view(len(params), group["parts"], shape[0] // group["parts"], shape[1])
                updates = orthogonalize(parts).view(nesterov.shape).unbind(0)  # one per matrix
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
                torch._foreach_add_(params, updates, alpha=-group["lr"] * 0.2 * math.sqrt(max(parts.shape[-2:])))


class Optimizers:
    """Several optimizers stepped as one, so the loop sets one learning rate, clips once and saves
    one state, whichever optimizers the config chose."""

    def __init__(self, optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return [optimizer.state_dict() for optimizer in self.optimizers]

    def load_state_dict(self, states):
        states = [states] if isinstance(states, dict) else states  # a state saved before Muon: one AdamW
        if len(states) != len(self.optimizers):
            raise SystemExit("error: cannot resume: the saved optimizer state does not match --optimizer; "
                             "resume with the optimizer the run started with")
        for optimizer, state in zip(self.optimizers, states):
            optimizer.load_state_dict(state)


def make_optimizer(net, config, device):
    """Muon (optimizer=muon, the default) for the blocks' 2-D weight matrices and AdamW for the
    embedding (tied to the head) and the norms, as the nanoGPT speedruns do, or AdamW for every
    parameter (optimizer=adamw); both take learning_rate and weight_decay. Matrices decay; norms do
    not. AdamW uses the fused kernel on CUDA and CPU, torch's default (for-each) one on MPS."""
    named = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    use_muon = lambda name, p: config["optimizer"] == "muon" and name.startswith("blocks.") and p.dim() == 2
    matrices = [p for name, p in named if use_muon(name, p)]
    rest = [(name, p) for name, p in named if not use_muon(name, p)]
    decays = lambda p: p.dim() >= 2 and not hasattr(p, "trained_rows")  # LoRA's embedding: its frozen rows must stay put
    adamw = torch.optim.AdamW([{"params": [p for _, p in rest if decays(p)], "weight_decay": config["weight_decay"]},
                               {"params": [p for _, p in rest if not decays(p)], "weight_decay": 0.0}],
                              lr=config["learning_rate"], betas=(0.9, config["beta2"]), fused=device.type in ("cuda", "cpu"))
    if not matrices:
        return Optimizers([adamw])
    # q, k and v (and the MLP's gate and value) are separate matrices that share one weight for
    # speed; orthogonalised as their parts they learned more (benchmarks/README.md, "Muon").
    parts = lambda name: 3 if name.endswith("attn.qkv.weight") else 2 if name.endswith("mlp.up.weight") else 1
    groups = [{"params": [p for name, p in named if use_muon(name, p) and parts(name) == n], "parts": n} for n in (1, 2, 3)]
    return Optimizers([Muon([g for g in groups if g["params"]], config["learning_rate"], config["weight_decay"]), adamw])


# ----------------------------------------------------------------------------------------------
# The step: gradients over micro-batches, and the out-of-memory back-off
# ----------------------------------------------------------------------------------------------
def forward_backward(model, x, y, micro_batch, runtime, scaler, config):
    """Gradients of the mean loss over all windows, in micro-batches of `micro_batch` windows.
    Each micro-batch's loss is weighted by its share because backward() sums gradients."""
    total = torch.zeros((), device=runtime.device)  # a tensor: reading it would wait for the GPU
    chunks = list(zip(x.split(micro_batch), y.split(micro_batch)))
    for i, (xb, yb) in enumerate(chunks):
        last = i == len(chunks) - 1
        # DDP averages gradients across processes on the last micro-batch only.
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with runtime.autocast():
                _, loss = model(xb.to(runtime.device, non_blocking=True), yb.to(runtime.device, non_blocking=True),
                                label_smoothing=config["label_smoothing"])
            scaler.scale(loss * len(xb) / len(x)).backward()
        total += loss.detach() * len(xb) / len(x)
    return total


def with_oom_backoff(step, micro_batch, log):
    """Run step(micro_batch). On CUDA out-of-memory, halve the micro-batch (so twice as many are
    accumulated and the effective batch stays the same), log it and retry. step() must start from
    zeroed gradients, since a failed attempt may have left some behind."""
    while True:
        try:
            return step(micro_batch), micro_batch
        except torch.cuda.OutOfMemoryError:
            if micro_batch == 1:
                raise SystemExit("error: out of memory even with a micro-batch of 1; "
                                 "lower seq_length or hidden_size") from None
            log(f"out of memory: micro-batch {micro_batch} -> {micro_batch // 2}, accumulating twice as "
                f"many; the effective batch is unchanged")
            micro_batch //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(net, ids, mask, config, runtime):
    """Mean loss over fixed, evenly spaced val windows: the same windows every time."""
    net.eval()
    seq_length = min(config["seq_length"], len(ids) - 1)
    starts = torch.linspace(0, len(ids) - seq_length - 1, config["eval_windows"]).long().unique()
    total, count = 0.0, 0
    for batch in starts.split(config["batch_size"]):
        x, y = windows(ids, mask, batch, seq_length)
        with runtime.autocast():
            _, loss = net(x.to(runtime.device), y.to(runtime.device))
        n = int((y != -1).sum())
        if n:
            total, count = total + float(loss) * n, count + n
    net.train()
    return total / max(count, 1)


def end_of_turn_rate(net, prompts, runtime, seed=0):
    """The share of held-out prompts whose reply, sampled as ChatAI samples by default (temperature
    0.8, top-k 40) with a fixed seed, closes its turn with <|end|> within END_PROBE_CHARS. A
    chatbot that never ends its turn reads well in val loss and badly in a chat; this says which.
    All prompts run as one batch through the KV cache: seconds, even when no reply ends."""
    net.eval()
    cache = M.new_cache(net, len(prompts))
    rows = [M.Row(list(p), END_PROBE_CHARS, slot, temperature=0.8, top_k=40, stop_ids=M.TURN_ENDS,
                  generator=torch.Generator(runtime.device).manual_seed(seed + slot)) for slot, p in enumerate(prompts)]
    with runtime.autocast():
        while live := [row for row in rows if not row.done]:
            M.advance(net, cache, live)
    net.train()
    return sum(row.ids[-1] == M.END for row in rows) / len(rows)


def turn_ends(rate, prompts):
    return f"ends its turn in {rate:.0%} of {len(prompts)} held-out replies"


def probe_replies(net, vocab, max_chars, seed=0):
    """Short replies to fixed prompts through the chat template, so progress can be read."""
    replies = []
    for prompt in PROBES:
        ids, _ = M.render_chat([{"role": "user", "content": prompt}], vocab, add_generation_prompt=True)
        out = M.generate(net, ids, max_chars, temperature=0.8, top_k=40, generator=torch.Generator().manual_seed(seed))
        replies.append((prompt, vocab.decode(i for i in out if i != M.END)))
    net.train()
    return replies


# ----------------------------------------------------------------------------------------------
# Logging and files
# ----------------------------------------------------------------------------------------------
def output_files(out_dir, best="Model.pth", prefix="train"):
    """Where a run writes: the best model, resumable state, metrics and the loss-curve plot."""
    return {"best": os.path.join(out_dir, best), "state": os.path.join(out_dir, f"{prefix}_state.pth"),
            "metrics": os.path.join(out_dir, f"{prefix}_metrics.jsonl"),
            "plot": os.path.join(out_dir, f"{prefix}_loss.png")}


def log_metrics(path, record):
    """Append one record. One short write per line: a crash loses at most the line being written,
    and start_metrics() drops such a torn line on resume."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def start_metrics(path, last_step):
    """Keep the records up to last_step (0 for a fresh run) and drop the rest: a resumed run redoes
    the steps after its checkpoint, and they must not appear twice. Rewritten atomically."""
    kept = []
    if last_step and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash
                if record.get("step", math.inf) <= last_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
    data.write_text(path, "".join(kept))


def plot_losses(metrics_path, png_path):
    """A loss-curve PNG, only when matplotlib is installed; training never needs it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    with open(metrics_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "val"):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), label=key)
    ax.set(xlabel="step", ylabel="loss (nats/char)", title="LuminaAI training")
    ax.legend()
    data.atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return True


@contextlib.contextmanager
def stop_on_signals():
    """While inside, Ctrl-C or SIGTERM does not kill the run: it appends to the yielded list, and
    the loop stops after the current step and saves. A second Ctrl-C interrupts at once."""
    asked = []

    def handler(signum, frame):
        if asked and signum == signal.SIGINT:
            raise KeyboardInterrupt
        asked.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield asked
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------------------------
# The training loop (fine_tune.py runs it too)
# ----------------------------------------------------------------------------------------------
class Trainer:
    """One run: the model, its optimizer, the data sampler and the loop's position. `meta` holds
    extra checkpoint fields (stage, base model...); `files` comes from output_files()."""

    def __init__(self, config, net, found, runtime, files, meta, end_probes=False):
        self.config, self.net, self.data, self.runtime, self.files, self.meta = config, net, found, runtime, files, meta
        self.end_probes = end_probes and bool(found.val_prompts)  # the end-of-turn rate at every evaluation
        self.log = tqdm.write if runtime.is_main else (lambda *a: None)
        net.to(runtime.device).train()
        self.optimizer = make_optimizer(net, config, runtime.device)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype == torch.float16)
        self.sampler = torch.Generator().manual_seed(config["seed"] + runtime.rank)  # each process its own windows
        self.step, self.best_val, self.val_loss, self.micro_batch = 0, math.inf, None, config["batch_size"]
        self.t0 = time.time()
        self.model = net  # what runs the steps: net, wrapped for several processes and compiled
        if runtime.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
        if choose_compile(config, runtime, self.log):
            self.model = torch.compile(self.model)

    def resume(self, state):
        """Continue exactly where `state` (a loaded *_state.pth) stopped: same windows, same losses."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.set_state(state["rng"]["sampler"][self.runtime.rank])
        torch.set_rng_state(state["rng"]["torch"])
        self.step, self.best_val, self.micro_batch = state["step"], state["best_val"], state["micro_batch"]
        self.t0 = time.time() - state["elapsed"]

    def run(self):
        """Train until max_iters or max_minutes; returns the final metrics. Exits 130 after Ctrl-C."""
        config, runtime = self.config, self.runtime
        if runtime.is_main:
            start_metrics(self.files["metrics"], self.step)
        per_step = config["batch_size"] * config["grad_accum"] // runtime.world  # windows per process per step
        since, budget = (time.time(), self.step), config["max_minutes"] * 60  # speed is measured since the last log
        bar = tqdm(total=config["max_iters"], initial=self.step, disable=None if runtime.is_main else True,
                   desc="training", dynamic_ncols=True, leave=False)  # None: no bar when not a terminal
        with stop_on_signals() as asked:
            while not self.stop_requested(asked):
                progress = max(self.step / config["max_iters"], (time.time() - self.t0) / budget if budget else 0.0)
                if progress >= 1:
                    break
                loss, lr = self.train_step(progress, per_step)
                bar.update(1)
                if self.step % config["log_interval"] == 0 and runtime.is_main:
                    since = self.log_step(loss, lr, since, per_step * runtime.world)
                if self.step % config["eval_interval"] == 0 and runtime.is_main:
                    self.evaluate_and_save()
                if self.step % config["checkpoint_interval"] == 0:
                    self.save_state()
        bar.close()
        return self.finish(bool(asked))

    def train_step(self, progress, per_step):
        """One optimizer step at the learning rate for `progress`; returns (loss tensor, lr)."""
        lr = lr_at(progress, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = random_windows(self.data.train, self.data.train_mask, per_step, self.config["seq_length"], self.sampler)

        def attempt(micro_batch):
            self.optimizer.zero_grad(set_to_none=True)  # also clears what a failed (out-of-memory) try left
            return forward_backward(self.model, x, y, micro_batch, self.runtime, self.scaler, self.config)

        loss, self.micro_batch = with_oom_backoff(attempt, self.micro_batch, self.log)
        if self.config["grad_clip"]:
            for optimizer in self.optimizer.optimizers:
                self.scaler.unscale_(optimizer)  # clip the true gradients, not fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.config["grad_clip"])
        for optimizer in self.optimizer.optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        self.step += 1
        return loss, lr

    def log_step(self, loss, lr, since, windows_per_step):
        """step 00420/05000 | loss 1.2345 | val 1.3012 | lr 3.0e-04 | 41 ms | 98,000 tok/s, with the
        speed since (time, step) `since`. Returns the new `since`."""
        now, steps = time.time(), self.step - since[1]
        tokens = steps * windows_per_step * min(self.config["seq_length"], len(self.data.train) - 1)
        record = {"step": self.step, "loss": loss.item(), "lr": lr, "ms": (now - since[0]) * 1000 / steps,
                  "tok_s": tokens / (now - since[0]), "elapsed": now - self.t0}
        val = "-" if self.val_loss is None else f"{self.val_loss:.4f}"
        self.log(f"step {self.step:0{len(str(self.config['max_iters']))}d}/{self.config['max_iters']} | "
                 f"loss {record['loss']:.4f} | val {val} | lr {lr:.1e} | {record['ms']:.0f} ms | {record['tok_s']:,.0f} tok/s")
        log_metrics(self.files["metrics"], record)
        return now, self.step

    def evaluate_and_save(self):
        """Val loss and bits/char, probe replies, and the best model file when val improved."""
        self.val_loss = evaluate(self.net, self.data.val, self.data.val_mask, self.config, self.runtime)
        metrics = {"step": self.step, "val": self.val_loss, "val_bpc": self.val_loss / math.log(2)}
        if self.end_probes:
            metrics["end_rate"] = end_of_turn_rate(self.net, self.data.val_prompts, self.runtime)
        # With end-of-turn probes the kept model is not simply the lowest val: a reply that never
        # ends costs END_WEIGHT bits/char, so ending every reply is worth 0.1 bits/char of val.
        score = self.val_loss + (1 - metrics["end_rate"]) * END_WEIGHT * math.log(2) if self.end_probes else self.val_loss
        improved = score < self.best_val
        self.log(f"eval step {self.step} | val {self.val_loss:.4f} | {metrics['val_bpc']:.3f} bits/char"
                 + (f" | {turn_ends(metrics['end_rate'], self.data.val_prompts)}" if self.end_probes else "")
                 + (" | best, saved" if improved else ""))
        if self.config["probe_chars"]:
            for prompt, reply in probe_replies(self.net, self.data.vocab, self.config["probe_chars"]):
                self.log(f"probe | {prompt} -> {reply!r}")
        log_metrics(self.files["metrics"], metrics)
        if improved:
            self.best_val = score
            M.save_checkpoint(self.files["best"], self.checkpoint({**metrics, "val_loss": self.val_loss}))

    def checkpoint(self, metrics):
        """What a model file holds: weights, vocabulary and both configs, plus `metrics` and meta."""
        return {"vocab": self.data.vocab.chars, "model_config": dataclasses.asdict(self.net.config),
                "model": M.model_state(self.net), "config": self.config, "metrics": metrics, **self.meta}

    def save_state(self):
        """The resumable checkpoint: the model plus everything needed to redo the same next step."""
        rng = {"torch": torch.get_rng_state(), "sampler": self.gather_sampler_states()}
        if self.runtime.is_main:
            M.save_checkpoint(self.files["state"], {
                **self.checkpoint({"val_loss": self.val_loss}), "optimizer": self.optimizer.state_dict(),
                "model": M.model_state(self.net, merge=False), "lora": M.lora_state(self.net),  # LoRA: base and adapters apart
                "step": self.step, "elapsed": time.time() - self.t0, "best_val": self.best_val,
                "micro_batch": self.micro_batch, "rng": rng})

    def gather_sampler_states(self):
        """Every process's data-sampler state, so a resumed run draws the same windows."""
        if self.runtime.world == 1:
            return [self.sampler.get_state()]
        states = [None] * self.runtime.world
        dist.all_gather_object(states, self.sampler.get_state())
        return states

    def stop_requested(self, asked):
        """True when any process was asked to stop: every process must leave the loop together."""
        if self.runtime.world == 1:
            return bool(asked)
        flag = torch.tensor([float(bool(asked))], device=self.runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def finish(self, interrupted):
        """Save; after Ctrl-C print how to resume and exit 130, else evaluate once more and plot."""
        if interrupted:
            self.save_state()
            if self.runtime.is_main:
                again = ["python", os.path.basename(sys.argv[0]), *sys.argv[1:]] + ["--resume"] * ("--resume" not in sys.argv)
                print(f"interrupted at step {self.step}: saved {self.files['state']}. Resume with: {' '.join(again)}")
            sys.exit(INTERRUPTED)
        if self.runtime.is_main and self.step % self.config["eval_interval"]:
            self.evaluate_and_save()  # a budgeted run ends with an evaluation, wherever it stopped
        self.save_state()
        if self.runtime.is_main and plot_losses(self.files["metrics"], self.files["plot"]):
            self.log(f"wrote {self.files['plot']}")
        return {"steps": self.step, "val_loss": self.val_loss, "best_val": self.best_val,
                "minutes": (time.time() - self.t0) / 60}


# ----------------------------------------------------------------------------------------------
def new_model(config, vocab):
    """A fresh transformer of the configured shape; ModelConfig owns the shape rules."""
    try:
        shape = M.ModelConfig(vocab_size=len(vocab), **{k: config[k] for k in
                                                        ("seq_length", "hidden_size", "num_layers", "nhead", "dropout")})
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return M.CharTransformer(shape)


def main(argv):
    config, flags, _ = parse_cli(argv, CONFIG, __file__, types=TYPES, rules=RULES, flags=("resume",))
    # --- runtime ---
    runtime = setup_runtime(config)
    log = print if runtime.is_main else (lambda *a: None)
    files = output_files(config["out_dir"])
    try:
        state = M.load_checkpoint(files["state"]) if flags["resume"] else None
    except M.CheckpointError as e:
        sys.exit(f"error: cannot resume: {e}")
    config = resolve_config(config, argv, state, runtime.device)
    torch.manual_seed(config["seed"])
    log(f"device {runtime.device} | dtype {str(runtime.dtype).replace('torch.', '')} | "
        f"{runtime.world} process(es) | threads {torch.get_num_threads()}")
    # --- data ---
    try:
        found = load_data(config["data"], os.path.join(config["out_dir"], ".lumina_cache"), config["val_fraction"],
                          config["assistant_only_loss"], config["seed"], M.Vocab(state["vocab"]) if state else None, log)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    if state and found.new_chars:
        sys.exit(f"error: the data has characters the checkpoint never saw ({''.join(list(found.new_chars)[:20])!r}); "
                 f"resume on the same data, or use fine_tune.py for new data")
    report_data(found, log)
    # --- model ---
    net = M.build_model(state)[0] if state else new_model(config, found.vocab)
    log(f"model: {net.num_params():,} parameters | {config['num_layers']} layers | width {config['hidden_size']} | "
        f"context {config['seq_length']}" + (f" | resuming from step {state['step']}" if state else ""))
    choose_dtype(net, config, runtime, log)
    # --- train ---
    trainer = Trainer(config, net, found, runtime, files, {"stage": "train"})
    if state:
        trainer.resume(state)
    result = trainer.run()
    log(f"done: {result['steps']} steps in {result['minutes']:.1f} min | best val {result['best_val']:.4f} "
        f"({result['best_val'] / math.log(2):.3f} bits/char) | wrote {files['best']}")
    if runtime.is_main and found.val_prompts:  # chat data: does the saved model end its turns?
        best = M.build_model(M.load_checkpoint(files["best"]))[0].to(runtime.device)
        log(f"{files['best']}: {turn_ends(end_of_turn_rate(best, found.val_prompts, runtime), found.val_prompts)}")
    if runtime.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
