"""The training run shared by Train.py and fine_tune.py: the runtime (device, precision,
processes), the step and its out-of-memory back-off, random state, signals, and the Trainer. What
the run is (its shape, precision, regularisation) is decided before, in lumina.plan; its files are
lumina.runfiles'.
"""
import contextlib
import dataclasses
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from lumina import checkpoint as ckpt, runfiles
from lumina.adapt import lora_state
from lumina.corpus import random_windows
from lumina.device import autocast, pick_device, seeded_generator
from lumina.evaluate import end_of_turn_rate, evaluate, probe_replies, turn_ends
from lumina.optim import lr_at, make_optimizer
from lumina.vocab import END

END_WEIGHT = 0.1        # bits/char of val that a fine-tune's model selection trades for ending every reply
INTERRUPTED = 130  # exit code after Ctrl-C, as shells report it


# ----------------------------------------------------------------------------------------------
# Setup: the device and the processes
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype = torch.float32  # lumina.plan.choose_dtype decides it once the model is built
    rank: int = 0
    world: int = 1
    is_main: bool = True  # rank 0: the one process that logs and saves

    def autocast(self):
        """Mixed precision for forward passes; does nothing in float32."""
        return autocast(self.device, self.dtype)


def setup_runtime(config):
    """One process, or one of torchrun's: nccl between GPUs, gloo between CPU processes."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and config.device.startswith("cuda:"):
        raise SystemExit(f"error: --device={config.device} with {world} processes would put every process on that "
                         f"one GPU; use --device=cuda, which gives each process its own (cuda:LOCAL_RANK)")
    try:
        device = pick_device(config.device, int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if config.grad_accum % world:
        raise SystemExit(f"error: grad_accum ({config.grad_accum}) must be a multiple of the number of processes "
                         f"({world}) so the effective batch stays the same; use --grad_accum={world}")
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if config.threads:
        torch.set_num_threads(config.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device, torch.float32, rank, world, rank == 0)


# ----------------------------------------------------------------------------------------------
# The step: gradients over micro-batches, and the out-of-memory back-off
# ----------------------------------------------------------------------------------------------
class LanguageModel:
    """The Trainer's objective for text and chats: a step's batch is n windows at random positions
    of the training ids, the loss the mean next-character cross-entropy over unmasked targets.
    (lumina.preference.DPO is the other objective: pairs of replies.)"""
    keeps_last = False  # the model file keeps the best evaluation, not the last
    metrics_names = ()  # figures of its own at each evaluation: none beyond val bits/char

    def __init__(self, ids, mask, seq_length, label_smoothing=0.0, short_context=0, short_share=0.0,
                 end_weight=1.0, vocab_size=None):
        self.ids, self.mask, self.seq_length, self.label_smoothing = ids, mask, seq_length, label_smoothing
        self.short_context, self.short_share = short_context, short_share
        # The loss weight of each target id: <|end|> counts end_weight times as much as a character.
        self.weights = None if end_weight == 1 else torch.ones(vocab_size).index_fill_(0, torch.tensor([END]), end_weight)

    def prepare(self, net, runtime, saved=None):
        """Nothing to prepare: text needs no reference model."""

    def state(self):
        return None

    def draw(self, n, sampler, progress=1.0):
        """n windows; in the first short_share of the run, as many characters in shorter windows:
        a step over short windows is cheaper, and early on the model learns little from far context."""
        if 0 < self.short_context < self.seq_length and progress < self.short_share:  # no phase longer than the context
            return random_windows(self.ids, self.mask, n * self.seq_length // self.short_context, self.short_context, sampler)
        return random_windows(self.ids, self.mask, n, self.seq_length, sampler)

    def split(self, batch, micro_batch):
        micro_batch = micro_batch * self.seq_length // batch[0].shape[1]  # short windows: as many characters
        return [(part, len(part[0]) / len(batch[0])) for part in zip(*(t.split(micro_batch) for t in batch))]

    def loss(self, model, chunk, runtime):
        x, y, before = (t.to(runtime.device, non_blocking=True) for t in chunk)
        if self.weights is not None and self.weights.device != runtime.device:
            self.weights = self.weights.to(runtime.device)
        return model(x, y, label_smoothing=self.label_smoothing, before=before, target_weights=self.weights)[1]

    def tokens(self, batch):
        return batch[0].numel()

    def metrics(self, net, runtime):
        return {}


def forward_backward(model, batch, micro_batch, runtime, scaler, objective):
    """Gradients of the objective's mean loss over the batch, in micro-batches of `micro_batch`
    windows (or pairs). Each micro-batch's loss is weighted by its share because backward() sums."""
    total = torch.zeros((), device=runtime.device)  # a tensor: reading it would wait for the GPU
    chunks = objective.split(batch, micro_batch)
    for i, (chunk, share) in enumerate(chunks):
        last = i == len(chunks) - 1
        # DDP averages gradients across processes on the last micro-batch only.
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with runtime.autocast():
                loss = objective.loss(model, chunk, runtime)
            scaler.scale(loss * share).backward()
        total += loss.detach() * share
    return total


def with_oom_backoff(step, micro_batch, log, device):
    """Run step(micro_batch). When the device runs out of memory, halve the micro-batch (so twice as
    many are accumulated and the effective batch stays the same), free the device's cache, log it
    and retry. step() must start from zeroed gradients, since a failed attempt may have left some."""
    while True:
        try:
            return step(micro_batch), micro_batch
        except RuntimeError as e:  # CUDA raises OutOfMemoryError (a RuntimeError); MPS a plain RuntimeError
            if not out_of_memory(e):
                raise
            if micro_batch == 1:
                raise SystemExit("error: out of memory even with a micro-batch of 1; "
                                 "lower seq_length or hidden_size") from None
            log(f"out of memory: micro-batch {micro_batch} -> {micro_batch // 2}, accumulating twice as "
                f"many; the effective batch is unchanged")
            micro_batch //= 2
        empty_cache(device)  # out of the except block: its traceback no longer holds the failed attempt's tensors


def out_of_memory(error):
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


def empty_cache(device):
    """Give the failed attempt's cached blocks back to the device that ran out."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


# ----------------------------------------------------------------------------------------------
# Random state: every process's, so a resumed run draws what the uninterrupted one would
# ----------------------------------------------------------------------------------------------
def rng_state(device, sampler):
    """This process's random state: the CPU's, its GPU's or MPS's (dropout there), and its data sampler's."""
    on_device = {"cuda": lambda: torch.cuda.get_rng_state(device), "mps": torch.mps.get_rng_state}.get(device.type)
    return {"cpu": torch.get_rng_state(), "device": on_device() if on_device else None, "sampler": sampler.get_state()}


def set_rng_state(saved, rank, device, sampler):
    """Restore rank's entry of `saved` (a list, one per process). A state saved before each process
    kept its own (a dict) holds the CPU state of rank 0 and every rank's sampler."""
    if isinstance(saved, dict):
        saved = [{"cpu": saved["torch"], "device": None, "sampler": state} for state in saved["sampler"]]
    if rank >= len(saved):
        raise SystemExit(f"error: cannot resume: the state was saved by {len(saved)} process(es); resume with as many")
    mine = saved[rank]
    torch.set_rng_state(mine["cpu"])
    if mine["device"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(mine["device"], device)
    elif mine["device"] is not None and device.type == "mps":
        torch.mps.set_rng_state(mine["device"])
    sampler.set_state(mine["sampler"])


# ----------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGINT, signal.SIGTERM)):
    """While inside, Ctrl-C or SIGTERM does not kill the run: it appends to the yielded list, and
    the loop stops after the current step and saves. A second Ctrl-C interrupts at once. (ChatAI
    stops a reply this way: a KeyboardInterrupt raised at any bytecode can land inside a write to
    stdout, and the text of that write, " [stopped]" once, is lost.)"""
    asked = []

    def handler(signum, frame):
        if asked and signum == signal.SIGINT:
            raise KeyboardInterrupt
        asked.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield asked
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------------------------
# The training loop (fine_tune.py runs it too)
# ----------------------------------------------------------------------------------------------
class Trainer:
    """One run: the model, its optimizer, the data sampler, the objective and the loop's position.
    `meta` holds extra checkpoint fields (stage, base model...); `files` comes from output_files();
    the objective is the next character of the training text unless one is given (DPO's pairs);
    `compile` (lumina.plan.choose_compile's decision) runs the steps through torch.compile."""

    def __init__(self, config, net, found, runtime, files, meta, end_probes=False, objective=None, compile=False):
        self.config, self.net, self.data, self.runtime, self.files, self.meta = config, net, found, runtime, files, meta
        self.objective = objective or LanguageModel(found.train, found.train_mask, config.seq_length,
                                                    config.label_smoothing, config.short_context or 0,  # None: no preset
                                                    config.short_share, config.end_weight,
                                                    net.config.vocab_size)
        self.end_probes = end_probes and bool(found.val_prompts)  # the end-of-turn rate at every evaluation
        self.log = tqdm.write if runtime.is_main else (lambda *a: None)
        net.to(runtime.device).train()
        self.optimizer = make_optimizer(net, config, runtime.device)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype == torch.float16)
        self.sampler = seeded_generator(config.seed + runtime.rank)  # each process its own windows
        self.step, self.best_val, self.val_loss, self.micro_batch = 0, math.inf, None, config.batch_size
        self.t0 = time.time()
        self.model = net  # what runs the steps: net, wrapped for several processes and compiled
        if runtime.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
        if compile:
            self.model = torch.compile(self.model)

    def resume(self, state):
        """Continue exactly where `state` (a loaded *_state.pth) stopped: same windows, same losses."""
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], self.runtime.rank, self.runtime.device, self.sampler)
        self.objective.prepare(self.net, self.runtime, state.get("objective"))
        self.step, self.best_val, self.micro_batch = state["step"], state["best_val"], state["micro_batch"]
        self.t0 = time.time() - state["elapsed"]

    def run(self):
        """Train until max_iters or max_minutes; returns the final metrics. Exits 130 after Ctrl-C."""
        config, runtime = self.config, self.runtime
        if runtime.is_main:
            runfiles.start_metrics(self.files["metrics"], self.step)
        if self.objective.state() is None:  # a fresh run: DPO scores the pairs with the starting model
            self.objective.prepare(self.net, runtime)
        per_step = config.batch_size * config.grad_accum // runtime.world  # windows (or pairs) per process per step
        since, budget = (time.time(), self.step), config.max_minutes * 60  # speed is measured since the last log
        bar = tqdm(total=config.max_iters, initial=self.step, disable=None if runtime.is_main else True,
                   desc="training", dynamic_ncols=True, leave=False)  # None: no bar when not a terminal
        with stop_on_signals() as asked:
            while True:
                progress = max(self.step / config.max_iters, (time.time() - self.t0) / budget if budget else 0.0)
                stop, progress = self.agree(bool(asked), progress)
                if stop or progress >= 1:
                    break
                loss, lr, tokens = self.train_step(progress, per_step)
                bar.update(1)
                if self.step % config.log_interval == 0 and runtime.is_main:
                    since = self.log_step(loss, lr, since, tokens * runtime.world)
                if self.step % config.eval_interval == 0 and runtime.is_main:
                    self.evaluate_and_save()
                if self.step % config.checkpoint_interval == 0:
                    self.save_state()
        bar.close()
        return self.finish(bool(asked))

    def train_step(self, progress, per_step):
        """One optimizer step at the learning rate for `progress`; returns (loss tensor, lr, tokens read)."""
        lr = lr_at(progress, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.objective.draw(per_step, self.sampler, progress)

        def attempt(micro_batch):
            self.optimizer.zero_grad(set_to_none=True)  # also clears what a failed (out-of-memory) try left
            return forward_backward(self.model, batch, micro_batch, self.runtime, self.scaler, self.objective)

        loss, self.micro_batch = with_oom_backoff(attempt, self.micro_batch, self.log, self.runtime.device)
        if self.config.grad_clip:
            for optimizer in self.optimizer.optimizers:
                self.scaler.unscale_(optimizer)  # clip the true gradients, not fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.config.grad_clip)
        for optimizer in self.optimizer.optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        self.step += 1
        return loss, lr, self.objective.tokens(batch)

    def log_step(self, loss, lr, since, tokens_per_step):
        """step 00420/05000 | loss 1.2345 | val 1.3012 | lr 3.0e-04 | 41 ms | 98,000 tok/s, with the
        speed since (time, step) `since`. Returns the new `since`."""
        now, steps = time.time(), self.step - since[1]
        tokens = steps * tokens_per_step
        record = {"step": self.step, "loss": loss.item(), "lr": lr, "ms": (now - since[0]) * 1000 / steps,
                  "tok_s": tokens / (now - since[0]), "elapsed": now - self.t0}
        val = "-" if self.val_loss is None else f"{self.val_loss:.4f}"
        self.log(f"step {self.step:0{len(str(self.config.max_iters))}d}/{self.config.max_iters} | "
                 f"loss {record['loss']:.4f} | val {val} | lr {lr:.1e} | {record['ms']:.0f} ms | {record['tok_s']:,.0f} tok/s")
        runfiles.log_metrics(self.files["metrics"], record)
        return now, self.step

    def evaluate_and_save(self):
        """Val loss and bits/char (and the objective's own figures), probe replies, and the model
        file when the run improved."""
        self.val_loss = evaluate(self.net, self.data.val, self.data.val_mask, self.config, self.runtime)
        metrics = {"step": self.step, "val": self.val_loss, "val_bpc": self.val_loss / math.log(2),
                   **self.objective.metrics(self.net, self.runtime)}
        if self.end_probes:
            metrics["end_rate"] = end_of_turn_rate(self.net, self.data.val_prompts, self.runtime.dtype,
                                                   max_chars=self.config.end_chars)
        # With end-of-turn probes the kept model is not simply the lowest val: a reply that never
        # ends costs END_WEIGHT bits/char, so ending every reply is worth 0.1 bits/char of val.
        score = self.val_loss + (1 - metrics["end_rate"]) * END_WEIGHT * math.log(2) if self.end_probes else self.val_loss
        improved = self.objective.keeps_last or score < self.best_val
        self.log(f"eval step {self.step} | val {self.val_loss:.4f} | {metrics['val_bpc']:.3f} bits/char"
                 + "".join(f" | {name.replace('_', ' ')} {metrics[name]:.3f}" for name in self.objective.metrics_names)
                 + (f" | {turn_ends(metrics['end_rate'], self.data.val_prompts)}" if self.end_probes else "")
                 + (" | saved" if self.objective.keeps_last else " | best, saved" if improved else ""))
        if self.config.probe_chars:
            for prompt, reply, logprob in probe_replies(self.net, self.data.vocab, self.config.probe_chars,
                                                        self.runtime.dtype):
                self.log(f"probe | {prompt} -> {reply!r} | mean log-prob {logprob:.2f}/char")
        runfiles.log_metrics(self.files["metrics"], metrics)
        if improved:
            self.best_val = min(score, self.best_val)
            ckpt.save_checkpoint(self.files["best"], self.checkpoint({**metrics, "val_loss": self.val_loss}))

    def checkpoint(self, metrics):
        """What a model file holds: weights, vocabulary and both configs, plus `metrics` and meta."""
        return {"vocab": self.data.vocab.chars, "model_config": dataclasses.asdict(self.net.config),
                "model": ckpt.model_state(self.net), "config": self.config.as_dict(), "metrics": metrics, **self.meta}

    def save_state(self):
        """The resumable checkpoint: the model plus everything needed to redo the same next step."""
        rng = self.gather_rng_states()
        if self.runtime.is_main:
            ckpt.save_checkpoint(self.files["state"], {
                **self.checkpoint({"val_loss": self.val_loss}), "optimizer": self.optimizer.state_dict(),
                "model": ckpt.model_state(self.net, merge=False), "lora": lora_state(self.net),  # LoRA: base and adapters apart
                "step": self.step, "elapsed": time.time() - self.t0, "best_val": self.best_val,
                "micro_batch": self.micro_batch, "rng": rng, "objective": self.objective.state()})

    def gather_rng_states(self):
        """Every process's random state (rng_state), so a resumed run draws the same windows and dropout."""
        mine = rng_state(self.runtime.device, self.sampler)
        if self.runtime.world == 1:
            return [mine]
        states = [None] * self.runtime.world
        dist.all_gather_object(states, mine)
        return states

    def agree(self, asked, progress):
        """(stop, progress) that every process shares: one asked to stop stops all, and the most
        advanced clock sets the learning rate and the end, so no process leaves the loop, or steps
        at another rate, while the others go on."""
        if self.runtime.world == 1:
            return asked, progress
        shared = torch.tensor([float(asked), progress], device=self.runtime.device)
        dist.all_reduce(shared, op=dist.ReduceOp.MAX)
        return bool(shared[0].item()), shared[1].item()

    def finish(self, interrupted):
        """Save; after Ctrl-C print how to resume and exit 130, else evaluate once more and plot."""
        if interrupted:
            self.save_state()
            if self.runtime.is_main:
                again = ["python", os.path.basename(sys.argv[0]), *sys.argv[1:]] + ["--resume"] * ("--resume" not in sys.argv)
                print(f"interrupted at step {self.step}: saved {self.files['state']}. Resume with: {' '.join(again)}")
            sys.exit(INTERRUPTED)
        if self.runtime.is_main and self.step % self.config.eval_interval:
            self.evaluate_and_save()  # a budgeted run ends with an evaluation, wherever it stopped
        self.save_state()
        if self.runtime.is_main and runfiles.plot_losses(self.files["metrics"], self.files["plot"]):
            self.log(f"wrote {self.files['plot']}")
        return {"steps": self.step, "val_loss": self.val_loss, "best_val": self.best_val,
                "minutes": (time.time() - self.t0) / 60}
