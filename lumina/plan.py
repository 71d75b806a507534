"""The run's plan, decided once before the loop: its typed config (TrainConfig: every key's type,
default and rule, the device presets, what older runs did), and the model's shape, precision,
regularisation and compilation. Each choose_* function measures or
reasons, logs its decision on one line and returns it; Train.py and fine_tune.py put it into the
run's config and runtime.
"""
import dataclasses
import math
import time
import typing

import torch
import torch.distributed as dist

from lumina import training
from lumina.config import check_rules
from lumina.device import DTYPE_CHOICES, DTYPES, dtype_line, seeded_generator, timed_dtype, trial_key
from lumina.model import CharTransformer, ModelConfig

COMPILE_MIN_MINUTES = 5.0  # compile=auto on a GPU: a budget at least this long (compiling costs about 1 min)
SHAPE_KEYS = ("seq_length", "hidden_size", "num_layers", "nhead", "dropout", "ngram_buckets", "qk_norm",
              "logit_softcap")  # a run's config -> ModelConfig
AT_LEAST_ONE = (1, math.inf)


def key(default, rule=None):
    """A TrainConfig field: its default and its rule ((low, high) for a number, or the choices)."""
    return dataclasses.field(default=default, metadata={"rule": rule} if rule else {})


@dataclasses.dataclass
class TrainConfig:
    """A training run's settings, typed and checked once: Train.py's keys (their meaning is in its
    commented CONFIG dict, which is what a user edits and which from_dict() converts), and the
    fine-tuning keys the Trainer reads. Checkpoints store it as a dict (as_dict). Every field's
    default is Train.py's; None means "auto" (the device preset, or a rule that logs its choice)."""
    # --- data ---
    data: str = "oasst1_data"
    val_fraction: float = key(0.05, (0.0, 0.5))
    assistant_only_loss: bool = False
    # --- model ---
    hidden_size: int | None = key(None, AT_LEAST_ONE)
    num_layers: int | None = key(None, AT_LEAST_ONE)
    nhead: int | None = key(None, AT_LEAST_ONE)
    seq_length: int | None = key(None, AT_LEAST_ONE)
    dropout: float | None = key(None, (0.0, 0.9))
    ngram_buckets: int | None = key(None, (0, 2 ** 20))
    qk_norm: bool = True
    logit_softcap: float = key(0.0, (0.0, 1000.0))
    # --- optimization ---
    optimizer: str = key("muon", ("adamw", "muon"))
    batch_size: int | None = key(None, AT_LEAST_ONE)
    grad_accum: int = key(1, AT_LEAST_ONE)
    learning_rate: float | None = key(None, (1e-9, 10.0))
    min_lr_ratio: float = key(0.0, (0.0, 1.0))
    warmup_ratio: float = key(0.05, (0.0, 0.5))
    decay_ratio: float = key(0.0, (0.0, 1.0))
    weight_decay: float | None = key(None, (0.0, math.inf))
    beta2: float = key(0.99, (0.0, 0.9999))
    grad_clip: float = key(1.0, (0.0, math.inf))
    label_smoothing: float = key(0.0, (0.0, 0.5))
    muon_steps: int = key(5, (1, 20))
    short_context: int | None = key(None, (0, 10 ** 5))
    short_share: float = key(0.6, (0.0, 1.0))
    end_weight: float = key(1.0, (0.0, 1000.0))  # fine_tune.py's: the loss weight of each <|end|>
    max_iters: int = key(20000, AT_LEAST_ONE)
    max_minutes: float = key(15.0, (0.0, math.inf))
    # --- evaluation and logging ---
    eval_interval: int = key(250, AT_LEAST_ONE)
    eval_windows: int = key(64, AT_LEAST_ONE)
    log_interval: int = key(50, AT_LEAST_ONE)
    probe_chars: int = key(80, (0, 10000))
    end_chars: int = key(2000, (1, 10 ** 6))
    # --- checkpointing ---
    out_dir: str = "."
    checkpoint_interval: int = key(500, AT_LEAST_ONE)
    # --- system ---
    device: str = "auto"
    dtype: str = key("auto", DTYPE_CHOICES)
    compile: str = key("auto", ("auto", "true", "false"))
    threads: int = key(0, (0, 1024))
    seed: int = 1337

    # Model shapes and batch sizes that suit each device; a key set in Train.py's CONFIG or on its
    # command line wins over the preset.
    # CPU: on 2 cores a 10-15 minute run is short, and many small steps beat a wider model. In
    # 3-minute runs on the real text (benchmarks/README.md, "Choosing the CPU preset") width 256 /
    # batch 32 reached 3.84 bits/char, width 128 / batch 32 3.22, and width 128 / batch 8 2.47. In
    # 10-minute runs context 256 / batch 4 matched context 128 / batch 8 (1.949 and 1.948) and holds
    # twice the chat history. With Muon (the default optimizer) batch 8 at 6e-3 learned most in 5
    # minutes ("Optimizer: Muon"); with --optimizer=adamw use batch 4 at 3e-3.
    # The first 60% of a CPU run on 64-character windows, with QK-norm (a default everywhere), won
    # three ten-minute pairs of three against the plain preset, by 0.016-0.022 bits/char ("Training").
    # GPU: a larger model for the same 15 minutes (not measured: no GPU yet).
    PRESETS = {
        "cpu": dict(hidden_size=128, num_layers=4, nhead=4, seq_length=256, batch_size=8, learning_rate=6e-3,
                    ngram_buckets=4096,  # n-grams: measured better in the same minutes (benchmarks/README.md)
                    short_context=64),
        "gpu": dict(hidden_size=512, num_layers=8, nhead=8, seq_length=512, batch_size=64, learning_rate=1e-3,
                    ngram_buckets=0, short_context=0),  # not yet measured on a GPU
    }
    # What a run saved before a key existed did: a resumed run, or a base model (one made by hand
    # that lacks a key fine-tunes with Train.py's CPU defaults for it).
    OLD_RUNS = {"optimizer": "adamw", "ngram_buckets": 0, "qk_norm": False, "logit_softcap": 0.0, "dropout": 0.0,
                "short_context": 0,
                "weight_decay": 0.1, "batch_size": 8, "grad_accum": 1, "min_lr_ratio": 0.0, "beta2": 0.99,
                "grad_clip": 1.0, "label_smoothing": 0.0, "eval_windows": 64}

    @classmethod
    def rules(cls):
        """Each key's rule, for lumina.config.check_rules."""
        return {f.name: f.metadata["rule"] for f in dataclasses.fields(cls) if "rule" in f.metadata}

    @classmethod
    def types(cls):
        """The type of each key whose default is None, which the command line cannot guess."""
        return {f.name: next(t for t in typing.get_args(f.type) if t is not type(None))
                for f in dataclasses.fields(cls) if f.default is None}

    @classmethod
    def from_dict(cls, values):
        """Train.py's config dict (or a saved run's, or fine_tune.py's merged one) as a TrainConfig:
        only its own keys (others are the caller's), a missing key at its default, every value
        checked by its rule (ConfigError), and an int where a float is wanted made a float."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        checked = check_rules({k: v for k, v in values.items() if k in fields}, cls.rules())
        floats = {name for name, f in fields.items() if float in (f.type, *typing.get_args(f.type))}
        return cls(**{k: float(v) if k in floats and type(v) is int else v for k, v in checked.items()})

    def with_preset(self, device_type):
        """The device's preset in the keys left at None."""
        preset = self.PRESETS["gpu" if device_type == "cuda" else "cpu"]
        return dataclasses.replace(self, **{k: v for k, v in preset.items() if getattr(self, k) is None})

    def as_dict(self):
        """What a checkpoint stores: plain values that torch.load(weights_only=True) reads."""
        return dataclasses.asdict(self)


RULES = TrainConfig.rules()
PRESETS = TrainConfig.PRESETS  # the shapes that the benchmarks build without training


# ----------------------------------------------------------------------------------------------
# The shape
# ----------------------------------------------------------------------------------------------
HEAD_WIDTH = 32  # the CPU preset's head width (128 / 4), kept as the model grows


def depth_shape(depth):
    """The model family the budget rule chooses from, on one dial as nanochat's --depth: `depth`
    blocks, width HEAD_WIDTH x depth, heads of HEAD_WIDTH. Depth 4 is the CPU preset's shape."""
    return dict(hidden_size=HEAD_WIDTH * depth, num_layers=depth, nhead=depth)


# The rule: the largest model of the family that will read at least CHARS_PER_PARAM characters
# per block parameter in its budget (Hoffmann et al. 2022, "Chinchilla": for a compute budget,
# parameters and data grow together, there about 20 tokens a parameter). Reading a fixed number
# of characters a parameter makes the best size grow as the square root of compute, Chinchilla's
# exponent. Each candidate's speed is timed on this machine, so a slower machine or a shorter
# budget gets a smaller model. Repeated data is worth less (REPEAT_WORTH).
DEPTHS = tuple(range(3, 17))  # the ladder: width 96 (about 0.3M block parameters) to 512 (about 50M)
# Fitted on depths 3-6 at 4, 12, 36 and 60 minutes (benchmarks/README.md, "Shape by budget"): depth
# 4 lost to depth 3 having read 4.2 characters a block parameter (12 min), and depth 5 beat depth 4
# having read 6.6 (60 min), so any ratio in (4.2, 6.6] picks every budget's winner; 5 is near the middle.
CHARS_PER_PARAM = 5.0
REPEAT_WORTH = 15.0  # Muennighoff et al. 2023: the n-th pass over the data is worth exp(-(n - 1) / 15) of new data


def context_for(depth, device_type):
    """The context grows with the model past the device preset's (64 characters a layer: 512 at
    depth 8) and never falls below it, since a chat keeps its earlier turns in it; the batch shrinks
    to keep the characters a step reads at the preset's."""
    preset = TrainConfig.PRESETS["gpu" if device_type == "cuda" else "cpu"]
    seq_length = max(preset["seq_length"], 2 * HEAD_WIDTH * depth)
    return dict(seq_length=seq_length, batch_size=max(1, round(preset["batch_size"] * preset["seq_length"] / seq_length)))


def worth_of(read, unique):
    """The characters a run reads, with each pass after the first worth less (REPEAT_WORTH)."""
    if read <= unique:
        return read
    return unique * (1 + REPEAT_WORTH * (1 - math.exp(-(read / unique - 1) / REPEAT_WORTH)))


def choose_shape(config, vocab_size, train_chars, device_type, log, step_seconds):
    """(shape keys, the logged line) for a run whose width, depth and heads are all left at None:
    the largest depth of the ladder whose run reads CHARS_PER_PARAM characters per block parameter
    (its budget at its speed, `step_seconds(candidate config)`, timed from the smallest up until
    one falls short; or max_iters alone when there is no time budget). A context or batch that was
    set is kept. ({}, None) when the user chose the shape: the device preset fills what is left."""
    if any(getattr(config, k) is not None for k in ("hidden_size", "num_layers", "nhead")):
        return {}, None
    chosen = None
    for depth in DEPTHS:
        context = {k: v for k, v in context_for(depth, device_type).items() if getattr(config, k) is None}
        keys = {**depth_shape(depth), **context}
        candidate = dataclasses.replace(config, **keys).with_preset(device_type)
        candidate = dataclasses.replace(candidate, dropout=candidate.dropout or 0.0)
        seconds = step_seconds(candidate) if config.max_minutes else None
        steps = planned_epochs(candidate, train_chars, seconds)[1]
        read = steps * candidate.batch_size * candidate.grad_accum * candidate.seq_length
        params = ModelConfig(vocab_size, **{k: getattr(candidate, k) for k in SHAPE_KEYS}).block_params()
        per_param = worth_of(read, train_chars) / params
        if chosen and per_param < CHARS_PER_PARAM:
            break
        chosen = (keys, candidate, params, read, per_param, seconds)
        if per_param < CHARS_PER_PARAM:
            break
    keys, candidate, params, read, per_param, seconds = chosen
    budget = (f"{config.max_minutes:g} min at {candidate.batch_size * candidate.seq_length / seconds:,.0f} characters/s "
              f"measured" if seconds else f"{config.max_iters:,} steps")
    line = (f"shape auto: depth {candidate.num_layers} (width {candidate.hidden_size}, {candidate.nhead} heads, context "
            f"{candidate.seq_length}, batch {candidate.batch_size}): {params:,} block parameters; {budget} reads "
            f"{read / 1e6:,.1f}M characters of {train_chars / 1e6:,.1f}M = {per_param:.1f} characters per block "
            f"parameter (the largest depth with at least {CHARS_PER_PARAM:g}, the rule in lumina/plan.py)")
    log(line)
    return keys, line


def step_timer(vocab, runtime, dtype):
    """choose_shape's step_seconds: a candidate's training step timed here (time_steps) in the
    precision `dtype` names (float32 for auto, which is decided later, on the chosen model)."""
    trial = runtime if dtype == "auto" else dataclasses.replace(runtime, dtype=DTYPES[dtype])
    return lambda candidate: time_steps(new_model(candidate, vocab).to(runtime.device), candidate, trial)


def new_model(config, vocab):
    """A fresh transformer of the configured shape; ModelConfig owns the shape rules."""
    try:
        shape = ModelConfig(vocab_size=len(vocab), **{k: getattr(config, k) for k in SHAPE_KEYS})
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return CharTransformer(shape)


# ----------------------------------------------------------------------------------------------
# Precision: timed on this model
# ----------------------------------------------------------------------------------------------
DTYPE_TRIAL_STEPS = 3  # timed training steps per precision when dtype=auto must measure (after one warm-up)


def choose_dtype(net, config, runtime, log):
    """The run's precision, decided once by the policy of every stage (lumina.device.timed_dtype):
    what `dtype` asks for, or for auto the faster of float32 and bf16 in a few real training steps
    of this model and batch (cached per machine). Logged on one line (chosen, asked, why) and
    returned; the run stores its name, so checkpoints hold the precision it used, not "auto"."""
    asked = config.dtype
    if asked == "auto" and runtime.device.type == "cpu" and runtime.world > 1:
        # every process must train in the same precision, and timings differ
        dtype, why = torch.float32, "several CPU processes; choose one with --dtype to use bf16"
    else:
        key = trial_key(runtime.device, dataclasses.asdict(net.config),
                        {"train batch": [config.batch_size, config.seq_length]})
        dtype, why = timed_dtype(asked, runtime.device, lambda name: [step_time(net, config, runtime, DTYPES[name])],
                                 key, "a training step")
    log(dtype_line(dtype, asked, why))
    return dtype


def step_time(net, config, runtime, dtype):
    """Seconds of one real training step of this model and batch in `dtype`: the best of a few,
    after a warm-up. A matmul peak says little when the model is small enough for everything else
    to dominate (on an EPYC with avx512_bf16, bf16's matmul peak was 2.4x fp32's, yet training ran
    at 0.88x), so the choice is measured on the actual model and batch. The gradients are dropped."""
    x = torch.randint(net.config.vocab_size, (config.batch_size, config.seq_length), generator=seeded_generator(0))
    text = training.LanguageModel(None, None, config.seq_length)
    trial, durations = dataclasses.replace(runtime, dtype=dtype), []
    for _ in range(1 + DTYPE_TRIAL_STEPS):
        start = time.perf_counter()
        training.forward_backward(net, (x, x, x[:, :2]), len(x), trial, torch.amp.GradScaler("cpu", enabled=False), text)
        durations.append(time.perf_counter() - start)
    net.zero_grad(set_to_none=True)
    return min(durations[1:])


# ----------------------------------------------------------------------------------------------
# Regularisation, and compiling
# ----------------------------------------------------------------------------------------------
# Regularisation by how many times the run will see its data (Muennighoff et al. 2023, "Scaling
# Data-Constrained Language Models": repeated data is nearly as good as new for about 4 epochs and
# loses its worth by about 16; nanoGPT's shakespeare-char, which sees its text ~80 times, uses 0.2).
DROPOUT_BY_EPOCHS = ((1.0, 0.0), (16.0, 0.1), (math.inf, 0.2))  # (at most this many epochs, dropout)
MAX_DECAY_PER_STEP = 0.01  # lr * weight decay: never forget more than 1% a step (tiny data would ask for more)
TIMED_STEPS = 3          # training steps timed, after as many to warm up, when the budget is in minutes


def planned_epochs(config, train_chars, step_seconds):
    """(epochs, steps): the passes over the training data the run will make, from its steps
    (max_iters, or as many as max_minutes allows at step_seconds each) and the characters a step reads."""
    steps = config.max_iters
    if config.max_minutes and step_seconds:
        steps = min(steps, config.max_minutes * 60 / step_seconds)
    per_step = config.batch_size * config.grad_accum * config.seq_length
    return steps * per_step / max(1, train_chars), steps


def regularisation(epochs, steps_per_epoch, learning_rate):
    """(dropout, weight decay) for a run of `epochs`. Dropout steps up with the repeats. Weight
    decay is sized to act over about one epoch (Wang and Aitchison 2024: the best timescale of
    AdamW's decay is a fixed share of the data): decoupled decay forgets with a timescale of
    1 / (lr * wd) steps, and a cosine schedule's mean rate is half its peak, so wd = 2 / (lr * steps
    per epoch), at most MAX_DECAY_PER_STEP / lr."""
    dropout = next(p for limit, p in DROPOUT_BY_EPOCHS if epochs <= limit)
    return dropout, min(2.0 / max(1.0, steps_per_epoch), MAX_DECAY_PER_STEP) / learning_rate


def choose_regularisation(net, config, train_chars, runtime, log):
    """(dropout, weight decay): those set in config, and those left at None (auto) by
    regularisation(), from the epochs the run will see: its budget, its data and its speed (a few
    timed steps), all logged."""
    if config.dropout is not None and config.weight_decay is not None:
        return config.dropout, config.weight_decay
    seconds = time_steps(net, config, runtime) if config.max_minutes else None
    if seconds and runtime.world > 1:  # every process must choose the same: the slowest one's time
        shared = torch.tensor([seconds], device=runtime.device)
        dist.all_reduce(shared, op=dist.ReduceOp.MAX)
        seconds = shared.item()
    epochs, steps = planned_epochs(config, train_chars, seconds)
    per_step = config.batch_size * config.grad_accum * config.seq_length
    dropout, decay = regularisation(epochs, train_chars / per_step, config.learning_rate)
    dropout = dropout if config.dropout is None else config.dropout
    decay = decay if config.weight_decay is None else config.weight_decay
    speed = f"{per_step / seconds:,.0f} characters/s measured, " if seconds else ""
    log(f"regularisation auto: {speed}{steps:,.0f} steps of {per_step:,} characters over {train_chars:,} = "
        f"{epochs:.2f} epochs -> dropout {dropout:g}, weight decay {decay:.3g}")
    return dropout, decay


def time_steps(net, config, runtime):
    """Seconds per training step of this model and batch, in the run's precision (eager)."""
    x = torch.randint(net.config.vocab_size, (config.batch_size * config.grad_accum, config.seq_length),
                      generator=seeded_generator(0)).to(runtime.device)
    text, scaler, durations = training.LanguageModel(None, None, config.seq_length), torch.amp.GradScaler(enabled=False), []
    for _ in range(2 * TIMED_STEPS):  # the first steps of a process set up its kernels: slow
        start = time.perf_counter()
        training.forward_backward(net, (x, x, x[:, :2]), config.batch_size, runtime, scaler, text)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        durations.append(time.perf_counter() - start)
    net.zero_grad(set_to_none=True)
    return min(durations[TIMED_STEPS:])


def choose_compile(config, runtime, log):
    """compile=true or false is obeyed. auto compiles only where it was measured to pay: on a CPU,
    compiled steps of the CPU preset were no faster than eager ones (benchmarks/README.md, "When
    torch.compile pays"), so the 35-60 s of compiling never comes back; on a GPU, whose step is
    mostly kernel launches that compiling fuses, when the budget leaves COMPILE_MIN_MINUTES to win
    it back."""
    if config.compile != "auto":
        return config.compile == "true"
    budget = config.max_minutes
    chosen = runtime.device.type == "cuda" and (not budget or budget >= COMPILE_MIN_MINUTES)
    length = f"a {budget:g}-minute budget" if budget else "no time budget"
    why = {"cuda": f"{length} {'leaves time to win back' if chosen else 'is too short to win back'} a minute of compiling",
           "cpu": "compiled steps were measured no faster than eager ones on CPUs"}.get(runtime.device.type, "not measured here")
    log(f"compile auto: {'on' if chosen else 'off'} ({why})")
    return chosen
