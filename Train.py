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
  python Train.py --resume                          # continue after Ctrl-C or a crash
  torchrun --nproc_per_node=4 Train.py              # 4 GPUs on one machine (DistributedDataParallel)
  python Train.py --help                            # every key, with its comment and default
"""
import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import model as M

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
    "batch_size": None,            # sequences per micro-batch, per process
    "grad_accum": 1,               # micro-batches per optimizer step, summed over all processes
    "learning_rate": None,         # peak AdamW learning rate
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
    "compile": False,              # torch.compile the model: faster steps after a one-off compile (~1 min)
    "threads": 0,                  # CPU threads; 0 = one per physical core
    "seed": 1337,                  # same seed, same data and same losses
}
# Keys that default to None take these types on the command line.
TYPES = {"hidden_size": int, "num_layers": int, "nhead": int, "seq_length": int,
         "batch_size": int, "learning_rate": float}

# Model shapes and batch sizes that suit each device; any key set above wins over the preset.
# CPU: on 2 cores a 10-15 minute run is short, and many small steps beat a wider model. In 3-minute
# runs on the real text (README, "Choosing the CPU preset") width 256 / batch 32 reached 3.84
# bits/char, width 128 / batch 32 3.22, and width 128 / batch 8 2.47. In 10-minute runs context
# 256 / batch 4 matched context 128 / batch 8 (1.949 and 1.948) and holds twice the chat history.
# GPU: a larger model for the same 15 minutes (not measured here: no GPU).
PRESETS = {
    "cpu": dict(hidden_size=128, num_layers=4, nhead=4, seq_length=256, batch_size=4, learning_rate=3e-3),
    "gpu": dict(hidden_size=512, num_layers=8, nhead=8, seq_length=512, batch_size=64, learning_rate=1e-3),
}
PROBES = ["Hello! How are you today?", "What is the capital of France?", "Give me a tip for learning Python."]
CACHE_VERSION = 1
INTERRUPTED = 130  # exit code after Ctrl-C, as shells report it


class DataError(Exception):
    """Training data that cannot be used; the message says what and how to fix it."""


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
def check_config(cfg):
    """Refuse values that would fail later or train nonsense, naming the allowed range."""
    rules = [("val_fraction", 0.0, 0.5), ("warmup_ratio", 0.0, 0.5), ("min_lr_ratio", 0.0, 1.0),
             ("dropout", 0.0, 0.9), ("label_smoothing", 0.0, 0.5), ("grad_clip", 0.0, math.inf),
             ("max_minutes", 0.0, math.inf), ("weight_decay", 0.0, math.inf), ("beta2", 0.0, 0.9999)]
    rules += [(k, 1, math.inf) for k in ("hidden_size", "num_layers", "nhead", "seq_length", "batch_size",
                                         "grad_accum", "max_iters", "eval_interval", "eval_windows",
                                         "log_interval", "checkpoint_interval")]
    for key, low, high in rules:
        if cfg.get(key) is not None and not low <= cfg[key] <= high:
            raise SystemExit(f"error: {key} must be between {low} and {high}, got {cfg[key]}")
    if cfg["learning_rate"] is not None and cfg["learning_rate"] <= 0:
        raise SystemExit(f"error: learning_rate must be positive, got {cfg['learning_rate']}")
    return cfg


def apply_preset(cfg, device):
    """Fill keys left at None from the preset for this device type."""
    preset = PRESETS["gpu" if device.type == "cuda" else "cpu"]
    return {**cfg, **{k: v for k, v in preset.items() if cfg.get(k) is None}}


# ----------------------------------------------------------------------------------------------
# Data: files -> documents -> one long array of ids, cached on disk
# ----------------------------------------------------------------------------------------------
ROLE_NAMES = {"prompter": "user", "user": "user", "assistant": "assistant", "system": "system"}


def find_files(path):
    """(train_files, val_files). Dataset_download.py's folder has its own split; in any other
    folder a file whose name says valid/val/test is validation."""
    if os.path.isfile(path):
        return [path], []
    if not os.path.isdir(path):
        hint = " Run `python Dataset_download.py` first." if os.path.basename(path.rstrip("/")) == "oasst1_data" else ""
        raise DataError(f"data path {path} does not exist.{hint}")
    prepared = os.path.join(path, "train.jsonl")
    if os.path.exists(prepared):
        val = os.path.join(path, "validation.jsonl")
        return [prepared], [val] if os.path.exists(val) else []
    files = sorted(f for ext in ("jsonl", "json", "txt") for f in glob.glob(os.path.join(path, f"*.{ext}")))
    if not files:
        raise DataError(f"{path} holds no .jsonl, .json or .txt files. For OASST1, run "
                        f"`python Dataset_download.py` first.")
    is_val = lambda f: any(w in os.path.basename(f).lower() for w in ("valid", "val.", "val_", "test"))
    return [f for f in files if not is_val(f)], [f for f in files if is_val(f)]


def read_file(path, problems):
    """Documents in one file: ("chat", messages) or ("text", str). Bad lines go to `problems`."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if path.endswith((".jsonl", ".json")):
        return rows_to_documents(read_jsonl(text, path, problems), path, problems)
    if any(line.startswith(("<|user|>", "<|bot|>")) for line in text.splitlines()):
        return parse_marked_text(text, path, problems)
    return [("text", p) for p in text.split("\n\n") if p.strip()]


def read_jsonl(text, path, problems):
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{number}: not valid JSON ({e.msg})")
            continue
        if isinstance(row, dict):
            rows.append((number, row))
        else:
            problems.append(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
    return rows


def rows_to_documents(rows, path, problems):
    """Chat rows become chats, OASST message rows are threaded, bare text rows are prose."""
    documents, oasst_rows = [], []
    for number, row in rows:
        if isinstance(row.get("messages"), list):
            chat = clean_chat(row["messages"])
            if chat:
                documents.append(("chat", chat))
            else:
                problems.append(f"{path}:{number}: 'messages' needs role/content objects with text")
        elif isinstance(row.get("text"), str) and row.get("role") in ROLE_NAMES:
            oasst_rows.append(row)
        elif isinstance(row.get("text"), str):
            if row["text"].strip():
                documents.append(("text", row["text"]))
        else:
            problems.append(f"{path}:{number}: no 'messages' list or 'text' string")
    return documents + [("chat", chat) for chat in thread_oasst_rows(oasst_rows)]


def clean_chat(messages):
    """Keep well-formed messages, renaming OASST's 'prompter' to 'user'; [] if none remain."""
    chat = [{"role": ROLE_NAMES[m["role"]], "content": m["content"]} for m in messages
            if isinstance(m, dict) and m.get("role") in ROLE_NAMES and isinstance(m.get("content"), str)]
    return chat if len(chat) == len(messages) else []


def thread_oasst_rows(rows):
    """Follow parent_id from each root, taking the best-ranked reply at each branch. Rows without
    ids are paired in file order: each user row with the assistant rows that follow it."""
    if rows and all("message_id" in r and "parent_id" in r for r in rows):
        children = {}
        for r in rows:
            children.setdefault(r["parent_id"], []).append(r)
        rank = lambda r: r["rank"] if r.get("rank") is not None else math.inf
        threads = []
        for root in children.get(None, []):
            thread, node = [], root
            while node is not None:
                thread.append({"role": ROLE_NAMES[node["role"]], "content": node["text"]})
                node = min(children.get(node["message_id"], []), key=rank, default=None)
            threads.append(thread)
        return threads
    threads = []
    for r in rows:
        if ROLE_NAMES[r["role"]] == "user" or not threads:
            threads.append([])
        threads[-1].append({"role": ROLE_NAMES[r["role"]], "content": r["text"]})
    return threads


def parse_marked_text(text, path, problems):
    """<|user|> and <|bot|> at a line's start open a turn; other lines continue it. Each user turn
    and the bot turns after it form one conversation."""
    chats = []
    for number, line in enumerate(text.splitlines(), start=1):
        marker = next((m for m in ("<|user|>", "<|bot|>") if line.startswith(m)), None)
        if marker == "<|user|>" or (marker and not chats):
            chats.append([])
        if marker:
            role = "user" if marker == "<|user|>" else "assistant"
            chats[-1].append({"role": role, "content": line[len(marker):].strip()})
        elif chats:
            chats[-1][-1]["content"] += "\n" + line
        elif line.strip():
            problems.append(f"{path}:{number}: text before the first <|user|> or <|bot|> marker")
    return [("chat", [{**m, "content": m["content"].strip()} for m in chat]) for chat in chats]


def document_chars(documents):
    counts = Counter()
    for kind, doc in documents:
        for text in [doc] if kind == "text" else [m["content"] for m in doc]:
            counts.update(text)
    return counts


def encode_documents(documents, vocab, assistant_only):
    """One int32 array of ids and a bool array that is True where the next-id loss counts."""
    ids, mask = [], []
    for kind, doc in documents:
        if kind == "chat":
            doc_ids, doc_mask = M.render_chat(doc, vocab)
            mask += doc_mask if assistant_only else [True] * len(doc_ids)
        else:
            doc_ids = vocab.encode(doc + "\n\n")  # prose trains on everything
            mask += [True] * len(doc_ids)
        ids += doc_ids
    return np.array(ids, dtype=np.int32), np.array(mask, dtype=bool)


@dataclasses.dataclass
class Data:
    train: torch.Tensor        # int32 ids
    train_mask: torch.Tensor   # bool: loss counts at this target
    val: torch.Tensor
    val_mask: torch.Tensor
    vocab: M.Vocab
    new_chars: dict            # characters absent from base_vocab -> count
    problems: list             # "file:line: reason" for every skipped line


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_data(path, cache_dir, val_fraction, assistant_only, seed, base_vocab=None, log=print):
    """Read, split, build the vocabulary and encode, or reuse the cache made from the same inputs.

    The vocabulary is base_vocab extended by any new characters, or built from the data.
    """
    train_files, val_files = find_files(path)
    key = hashlib.sha256(json.dumps([CACHE_VERSION, [(os.path.basename(f), file_digest(f)) for f in
                                     train_files + val_files], len(train_files), val_fraction,
                                     assistant_only, seed, base_vocab and base_vocab.chars]).encode()).hexdigest()
    cache = os.path.join(cache_dir, f"tokens-{key[:16]}.npz")
    if os.path.exists(cache):
        log(f"data: reusing the encoded cache {cache}")
        return data_from_arrays(dict(np.load(cache)))
    problems = []
    train_docs = [d for f in tqdm(train_files, desc="reading", leave=False) for d in read_file(f, problems)]
    val_docs = [d for f in val_files for d in read_file(f, problems)]
    if not val_docs:  # hold out whole documents, so no conversation sits in both splits
        random.Random(seed).shuffle(train_docs)
        cut = max(1, round(len(train_docs) * val_fraction)) if len(train_docs) > 1 else 0
        val_docs, train_docs = train_docs[:cut], train_docs[cut:]
    if not train_docs:
        raise DataError(f"no usable text in {path}" + (f"; first problem: {problems[0]}" if problems else ""))
    counts = document_chars(train_docs + val_docs)
    vocab = base_vocab.extended(sorted(counts)) if base_vocab else M.Vocab(sorted(counts))
    new_chars = {c: counts[c] for c in vocab.chars[len(base_vocab.chars):]} if base_vocab else {}
    train, train_mask = encode_documents(train_docs, vocab, assistant_only)
    val, val_mask = encode_documents(val_docs or train_docs, vocab, assistant_only)
    arrays = dict(train=train, train_mask=train_mask, val=val, val_mask=val_mask,
                  vocab=np.array(vocab.chars, dtype=str), new_chars=np.array(list(new_chars), dtype=str),
                  new_counts=np.array(list(new_chars.values()), dtype=np.int64),
                  problems=np.array(problems, dtype=str))
    M.atomic_write(cache, lambda tmp: np.savez(open(tmp, "wb"), **arrays))
    return data_from_arrays(arrays)


def data_from_arrays(a):
    return Data(torch.from_numpy(a["train"]), torch.from_numpy(a["train_mask"]), torch.from_numpy(a["val"]),
                torch.from_numpy(a["val_mask"]), M.Vocab(a["vocab"].tolist()),
                dict(zip(a["new_chars"].tolist(), a["new_counts"].tolist())), a["problems"].tolist())


def report_data(data, log):
    for problem in data.problems[:20]:
        log(f"skipped {problem}")
    if len(data.problems) > 20:
        log(f"... and {len(data.problems) - 20} more skipped lines")
    log(f"data: {len(data.train):,} train ids, {len(data.val):,} val ids, vocabulary {len(data.vocab)} "
        f"({len(data.problems)} lines skipped)")


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
# Runtime: device, precision and processes, decided once before the loop
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    def autocast(self):
        """Mixed precision for forward passes; does nothing in float32."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)


def cpu_has_bf16():
    """AMX or AVX512-BF16 makes bf16 matmuls several times faster than fp32 (Linux only)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_device(name, local_rank):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind = name.split(":")[0]
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if kind not in available:
        raise SystemExit(f"error: device must be auto, cuda, cuda:N, mps or cpu, got {name!r}")
    if not available[kind]:
        raise SystemExit(f"error: device {name!r} is not available on this machine; use --device=auto or cpu")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


def pick_dtype(name, device):
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else torch.float32
    if name not in choices:
        raise SystemExit(f"error: dtype must be auto, {', '.join(choices)}, got {name!r}")
    return choices[name]


def setup_runtime(cfg):
    """One process, or one of torchrun's: nccl between GPUs, gloo between CPU processes."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(cfg["device"], int(os.environ.get("LOCAL_RANK", 0)))
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device, pick_dtype(cfg["dtype"], device), rank, world)


# ----------------------------------------------------------------------------------------------
# The training loop (fine_tune.py calls train() too)
# ----------------------------------------------------------------------------------------------
def lr_at(progress, cfg):
    """Linear warmup, then cosine decay to min_lr_ratio * learning_rate, over progress in [0, 1]."""
    peak, warmup = cfg["learning_rate"], cfg["warmup_ratio"]
    if progress < warmup:
        return peak * (progress + 1e-3) / warmup
    decay = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    floor = peak * cfg["min_lr_ratio"]
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * decay))


def make_optimizer(model, cfg, device):
    """AdamW; weight matrices decay, norms and biases do not. Fused where the device supports it."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(0.9, cfg["beta2"]), fused=fused)


@torch.no_grad()
def evaluate(model, ids, mask, cfg, runtime):
    """Mean loss over fixed, evenly spaced val windows: the same windows every time."""
    model.eval()
    seq_length = min(cfg["seq_length"], len(ids) - 1)
    starts = torch.linspace(0, len(ids) - seq_length - 1, cfg["eval_windows"]).long().unique()
    total, count = 0.0, 0
    for batch in starts.split(cfg["batch_size"]):
        x, y = windows(ids, mask, batch, seq_length)
        with runtime.autocast():
            _, loss = model(x.to(runtime.device), y.to(runtime.device))
        n = int((y != -1).sum())
        if n:
            total, count = total + float(loss) * n, count + n
    model.train()
    return total / max(count, 1)


def probe_replies(model, vocab, max_chars, seed=0):
    """Short replies to fixed prompts through the chat template, so progress can be read."""
    replies = []
    for prompt in PROBES:
        ids, _ = M.render_chat([{"role": "user", "content": prompt}], vocab, add_generation_prompt=True)
        out = M.generate(model, ids, max_chars, temperature=0.8, top_k=40,
                         generator=torch.Generator().manual_seed(seed))
        replies.append((prompt, vocab.decode(i for i in out if i != M.END)))
    model.train()
    return replies


def forward_backward(model, x, y, micro_batch, runtime, scaler, cfg):
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
                                label_smoothing=cfg["label_smoothing"])
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


class StopFlag:
    """While installed, Ctrl-C or SIGTERM asks the loop to stop after the current step and save;
    a second Ctrl-C interrupts at once."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.raised = False

    def __call__(self, signum, frame):
        if self.raised and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.raised = True

    def __enter__(self):
        self.previous = [signal.signal(sig, self) for sig in self.SIGNALS]
        return self

    def __exit__(self, *exc):
        for sig, handler in zip(self.SIGNALS, self.previous):
            signal.signal(sig, handler)


class Meter:
    """Speed since the last read: milliseconds per step and tokens per second."""

    def __init__(self):
        self.start, self.steps, self.tokens = time.time(), 0, 0

    def add(self, tokens):
        self.steps, self.tokens = self.steps + 1, self.tokens + tokens

    def read(self):
        seconds = time.time() - self.start
        speed = {"ms": seconds * 1000 / max(self.steps, 1), "tok_s": self.tokens / seconds}
        self.__init__()
        return speed


def log_line(record, max_iters, val_loss):
    """step 00420/05000 | loss 1.2345 | val 1.3012 | lr 3.0e-04 | 41 ms | 98,000 tok/s"""
    val = "-" if val_loss is None else f"{val_loss:.4f}"
    return (f"step {record['step']:0{len(str(max_iters))}d}/{max_iters} | loss {record['loss']:.4f} | val {val} | "
            f"lr {record['lr']:.1e} | {record['ms']:.0f} ms | {record['tok_s']:,.0f} tok/s")


def checkpoint_dict(model, vocab, cfg, meta, metrics):
    net = getattr(model, "module", model)
    return {"vocab": vocab.chars, "model_config": dataclasses.asdict(net.config), "model": M.model_state(net),
            "config": cfg, "metrics": metrics, **meta}


def log_metrics(path, record):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def plot_losses(metrics_path, png_path):
    """A loss-curve PNG, only when matplotlib is installed; training never needs it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in open(metrics_path, encoding="utf-8")]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "val"):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot(*zip(*points), label=key) if points else None
    ax.set(xlabel="step", ylabel="loss (nats/char)", title="LuminaAI training")
    ax.legend()
    M.atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return True


def output_files(out_dir, best="Model.pth", prefix="train"):
    """Where a run writes: the best model, resumable state, metrics and the loss-curve plot."""
    return {"best": os.path.join(out_dir, best), "state": os.path.join(out_dir, f"{prefix}_state.pth"),
            "metrics": os.path.join(out_dir, f"{prefix}_metrics.jsonl"),
            "plot": os.path.join(out_dir, f"{prefix}_loss.png")}


def train(cfg, model, vocab, data, runtime, meta, files, state=None):
    """Train until max_iters or max_minutes, saving the best model and resumable state to `files`
    (see output_files). meta holds extra checkpoint fields (stage, base model...). state is a
    loaded resumable checkpoint to continue from. Returns final metrics; exits 130 after Ctrl-C.
    """
    log = tqdm.write if runtime.is_main else (lambda *a: None)
    best_path, state_path, metrics_path = files["best"], files["state"], files["metrics"]
    model.to(runtime.device).train()
    optimizer = make_optimizer(model, cfg, runtime.device)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype == torch.float16)
    sampler = torch.Generator().manual_seed(cfg["seed"] + runtime.rank)  # each process its own windows
    step, elapsed_before, best_val = 0, 0.0, math.inf
    micro_batch = cfg["batch_size"]
    if state:
        optimizer.load_state_dict(state["optimizer"])
        sampler.set_state(state["rng"]["sampler"][runtime.rank])
        torch.set_rng_state(state["rng"]["torch"])
        step, elapsed_before, best_val = state["step"], state["elapsed"], state["best_val"]
        micro_batch = state["micro_batch"]
    if cfg["grad_accum"] % runtime.world:
        raise SystemExit(f"error: grad_accum ({cfg['grad_accum']}) must be a multiple of the number of "
                         f"processes ({runtime.world}) so the effective batch stays the same")
    per_step = cfg["batch_size"] * cfg["grad_accum"] // runtime.world  # windows per process per step
    net = model  # the plain module: what gets saved and what generates
    if runtime.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    if cfg["compile"]:
        model = torch.compile(model)
    budget, window = cfg["max_minutes"] * 60, min(cfg["seq_length"], len(data.train) - 1)
    val_loss, meter = None, Meter()
    t0 = time.time() - elapsed_before
    bar = tqdm(total=cfg["max_iters"], initial=step, disable=None if runtime.is_main else True,
               desc="training", dynamic_ncols=True, leave=False)  # None: no bar when not a terminal

    def save_state():
        rng = {"torch": torch.get_rng_state(), "sampler": gather_sampler_states(sampler, runtime)}
        if runtime.is_main:
            M.save_checkpoint(state_path, {**checkpoint_dict(net, vocab, cfg, meta, {"val_loss": val_loss}),
                                           "optimizer": optimizer.state_dict(), "step": step,
                                           "elapsed": time.time() - t0, "best_val": best_val,
                                           "micro_batch": micro_batch, "rng": rng})

    def step_fn(x, y, micro):
        optimizer.zero_grad(set_to_none=True)  # also clears what a failed (out-of-memory) try left
        return forward_backward(model, x, y, micro, runtime, scaler, cfg)

    with StopFlag() as stop:
        while True:
            elapsed = time.time() - t0
            progress = max(step / cfg["max_iters"], elapsed / budget if budget else 0.0)
            if progress >= 1 or stop_requested(stop, runtime):
                break
            lr = lr_at(progress, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = random_windows(data.train, data.train_mask, per_step, cfg["seq_length"], sampler)
            loss, micro_batch = with_oom_backoff(lambda micro: step_fn(x, y, micro), micro_batch, log)
            if cfg["grad_clip"]:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            step += 1
            meter.add(per_step * runtime.world * window)
            bar.update(1)
            if step % cfg["log_interval"] == 0 and runtime.is_main:
                record = {"step": step, "loss": loss.item(), "lr": lr, **meter.read(), "elapsed": time.time() - t0}
                log(log_line(record, cfg["max_iters"], val_loss))
                log_metrics(metrics_path, record)
            if step % cfg["eval_interval"] == 0 and runtime.is_main:
                val_loss, best_val = evaluate_and_save(net, vocab, data, cfg, runtime, meta, step, best_val,
                                                       best_path, metrics_path, log)
            if step % cfg["checkpoint_interval"] == 0:
                save_state()
    bar.close()
    if stop.raised:
        save_state()
        if runtime.is_main:
            again = " ".join(["python", os.path.basename(sys.argv[0]), *sys.argv[1:]] + ["--resume"] * ("--resume" not in sys.argv))
            print(f"interrupted at step {step}: saved {state_path}. Resume with: {again}")
        sys.exit(INTERRUPTED)
    if runtime.is_main and step % cfg["eval_interval"]:
        val_loss, best_val = evaluate_and_save(net, vocab, data, cfg, runtime, meta, step, best_val,
                                               best_path, metrics_path, log)
    save_state()
    if runtime.is_main and plot_losses(metrics_path, files["plot"]):
        log(f"wrote {files['plot']}")
    return {"steps": step, "val_loss": val_loss, "best_val": best_val, "minutes": (time.time() - t0) / 60}


def stop_requested(stop, runtime):
    """True when any process was asked to stop: every process must leave the loop together."""
    if runtime.world == 1:
        return stop.raised
    flag = torch.tensor([float(stop.raised)], device=runtime.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def gather_sampler_states(sampler, runtime):
    """Every process's data-sampler state, so a resumed run draws the same windows."""
    if runtime.world == 1:
        return [sampler.get_state()]
    states = [None] * runtime.world
    dist.all_gather_object(states, sampler.get_state())
    return states


def evaluate_and_save(net, vocab, data, cfg, runtime, meta, step, best_val, best_path, metrics_path, log):
    """Val loss and bits/char, probe replies, and Model.pth when val improved."""
    val_loss = evaluate(net, data.val, data.val_mask, cfg, runtime)
    bpc = val_loss / math.log(2)
    log(f"eval step {step} | val {val_loss:.4f} | {bpc:.3f} bits/char" + (" | best, saved" if val_loss < best_val else ""))
    if cfg["probe_chars"]:
        for prompt, reply in probe_replies(net, vocab, cfg["probe_chars"]):
            log(f"probe | {prompt} -> {reply!r}")
    log_metrics(metrics_path, {"step": step, "val": val_loss, "val_bpc": bpc})
    if val_loss < best_val:
        best_val = val_loss
        M.save_checkpoint(best_path, checkpoint_dict(net, vocab, cfg, meta,
                                                     {"val_loss": val_loss, "val_bpc": bpc, "step": step}))
    return val_loss, best_val


# ----------------------------------------------------------------------------------------------
def main(argv):
    cfg, flags = M.parse_cli(argv, CONFIG, __file__, flags=("resume",), types=TYPES)
    # --- runtime ---
    runtime = setup_runtime(cfg)
    log = print if runtime.is_main else (lambda *a: None)
    state, files = None, output_files(cfg["out_dir"])
    if flags["resume"]:
        state_path = files["state"]
        try:
            state = M.load_checkpoint(state_path)
        except M.CheckpointError as e:
            sys.exit(f"error: cannot resume: {e}")
        # The saved run's config, with anything given on this command line on top.
        cfg = M.apply_overrides({**CONFIG, **state["config"]}, [a for a in argv if a != "--resume"], TYPES)
    cfg = check_config(apply_preset(cfg, runtime.device))
    torch.manual_seed(cfg["seed"])
    log(f"device {runtime.device} | dtype {str(runtime.dtype).replace('torch.', '')} | "
        f"{runtime.world} process(es) | threads {torch.get_num_threads()}")
    # --- data ---
    try:
        data = load_data(cfg["data"], os.path.join(cfg["out_dir"], ".lumina_cache"), cfg["val_fraction"],
                         cfg["assistant_only_loss"], cfg["seed"], M.Vocab(state["vocab"]) if state else None, log)
    except DataError as e:
        sys.exit(f"error: {e}")
    if state and data.new_chars:
        sys.exit(f"error: the data has characters the checkpoint never saw ({''.join(list(data.new_chars)[:20])!r}); "
                 f"resume on the same data, or use fine_tune.py for new data")
    report_data(data, log)
    # --- model ---
    if state:
        net, _ = M.build_model(state)
        log(f"resuming from step {state['step']}")
    else:
        try:  # ModelConfig owns the shape rules (e.g. an even head size for rotary positions)
            shape = M.ModelConfig(vocab_size=len(data.vocab),
                                  **{k: cfg[k] for k in ("seq_length", "hidden_size", "num_layers", "nhead", "dropout")})
        except ValueError as e:
            sys.exit(f"error: {e}")
        net = M.CharTransformer(shape)
    log(f"model: {net.num_params():,} parameters | {cfg['num_layers']} layers | width {cfg['hidden_size']} | "
        f"context {cfg['seq_length']}")
    # --- train ---
    result = train(cfg, net, data.vocab, data, runtime, {"stage": "train"}, files, state)
    log(f"done: {result['steps']} steps in {result['minutes']:.1f} min | best val {result['best_val']:.4f} "
        f"({result['best_val'] / math.log(2):.3f} bits/char) | wrote {files['best']}")
    if runtime.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
