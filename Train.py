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
  python Train.py                                   # about 15 minutes, the model sized for that budget here
  python Train.py --max_minutes=240                 # a longer budget: a bigger model and a longer context
  python Train.py --max_minutes=1 --num_layers=2    # a tiny CPU example
  python Train.py --resume                          # continue after Ctrl-C, SIGTERM or a crash
  python Train.py --overwrite                       # replace the run in out_dir (by default a new run moves
                                                    #   the old one's files to out_dir/previous_runs/ and says so)
  torchrun --nproc_per_node=4 Train.py --grad_accum=4   # 4 GPUs on one machine (DistributedDataParallel)
  python Train.py --help                            # every key, with its comment and default
"""
import dataclasses
import math
import os
import sys

import torch
import torch.distributed as dist

from lumina import checkpoint as ckpt, data, plan, runfiles, training
from lumina.config import ConfigError, apply_overrides, parse_cli
from lumina.corpus import load_data, report_data
from lumina.device import dtype_name
from lumina.evaluate import end_of_turn_rate, turn_ends
from lumina.plan import RULES, TrainConfig
from lumina.vocab import Vocab

CONFIG = {
    # --- data ---
    "data": "oasst1_data",         # folder from Dataset_download.py, or your own file/folder (see docstring)
    "val_fraction": 0.05,          # share of documents held out when the data has no validation file (0-0.5)
    "assistant_only_loss": False,  # True: learn only assistant turns and their <|end|>; prose always trains
    # --- model (None = chosen for the budget: width, depth and heads left at None get the largest
    #     model this machine can train on enough characters in max_minutes, logged and stored) ---
    "hidden_size": None,           # width of the residual stream; 128-1024
    "num_layers": None,            # transformer blocks; 2-12
    "nhead": None,                 # attention heads; hidden_size / nhead of 32-128 works well
    "seq_length": None,            # context window in characters; 64-1024 (None: grows with the chosen model)
    "dropout": None,               # None: by the epochs the run will see (0 up to 1, 0.1 up to 16, 0.2 above; logged)
    "ngram_buckets": None,         # rows of each hashed table of 2- and 3-character contexts; 0 = none
    "qk_norm": True,               # queries and keys at unit RMS per head (QK-norm: steadier attention logits); False: off
    "logit_softcap": 0.0,          # > 0: output logits soft-capped at +-this (cap * tanh(logit / cap)); 0 = off
    # --- optimization ---
    "optimizer": "muon",           # muon: Muon for the blocks' weight matrices, AdamW for the rest; or adamw for all
    "batch_size": None,            # sequences per micro-batch, per process (None: the preset's characters per step)
    "grad_accum": 1,               # micro-batches per optimizer step, summed over all processes
    "learning_rate": None,         # peak learning rate (Muon's step is scaled to AdamW's, so one rate serves both)
    "min_lr_ratio": 0.0,           # the cosine decays to learning_rate * this; 0 = all the way down
    "warmup_ratio": 0.05,          # share of training spent warming up (0-0.5)
    "decay_ratio": 0.0,            # 0: cosine decay after the warmup; > 0: hold the peak, then decay linearly over
                                   #   this last share of the run (warmup-stable-decay; 0-1)
    "weight_decay": None,          # decoupled decay of the weight matrices; None: sized to act over about one epoch
    "beta2": 0.99,                 # AdamW beta2; 0.99 suits small batches
    "grad_clip": 1.0,              # max gradient norm; 0 turns clipping off
    "label_smoothing": 0.0,        # 0-0.2; off: it moves probability onto wrong characters, which bits/char punishes
    "muon_steps": 5,               # Newton-Schulz iterations per Muon step (fewer: cheaper, rougher)
    "short_context": None,         # > 0: train on windows this long (as many characters a step) for the first short_share
    "short_share": 0.6,            #   of the run, then on seq_length; 0 = seq_length throughout (None: 64 on a CPU)
    "max_iters": 20000,            # optimizer steps; training ends at max_iters or max_minutes, whichever first
    "max_minutes": 15.0,           # wall-clock budget including compilation; 0 = no budget
    # --- evaluation and logging ---
    "eval_interval": 250,          # steps between val evaluations; Model.pth is saved when val improves
    "eval_windows": 64,            # val windows per evaluation (fixed, evenly spaced, so evals compare)
    "log_interval": 50,            # steps between log lines
    "probe_chars": 80,             # length of the probe replies shown at each evaluation; 0 = none
    "end_chars": 2000,             # chat data: a held-out reply still open after this many characters never ended
    # --- checkpointing ---
    "out_dir": ".",                # where Model.pth, train_state.pth, metrics and the cache go
    "checkpoint_interval": 500,    # steps between resumable saves (also saved at the end and on Ctrl-C)
    # --- system ---
    "device": "auto",              # auto (cuda, then mps, then cpu), cuda, cuda:1, mps or cpu
    "dtype": "auto",               # auto (measured: see README), float32, bfloat16 or float16 (autocast; float16 adds a GradScaler)
    "compile": "auto",             # torch.compile the model: auto (by the rule in choose_compile), true or false
    "threads": 0,                  # CPU threads; 0 = one per physical core
    "seed": 1337,                  # same seed, same data and same losses
}
# Each key's type and rule, and the device presets, live in lumina.plan.TrainConfig, which this dict
# is converted into once.


def resolve_config(config, argv, state):
    """The run's TrainConfig, converted once: on --resume the saved run's config (a key it lacks as
    runs before that key did: TrainConfig.OLD_RUNS) with this command line on top. Keys left at None
    are filled once the data is read (choose_shape)."""
    try:
        if state:
            config = apply_overrides({**CONFIG, **TrainConfig.OLD_RUNS, **state["config"]},
                                     [a for a in argv if a != "--resume"], TrainConfig.types())
        return TrainConfig.from_dict(config)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def choose_shape(config, found, runtime, log):
    """(config, why): the model's shape by lumina.plan's rule when width, depth and heads are left
    at None, each candidate's steps timed here; then the device preset in the keys still at None.
    Every process takes the first one's choice, so that all build the same model."""
    timer = plan.step_timer(found.vocab, runtime, config.dtype)
    chosen = list(plan.choose_shape(config, len(found.vocab), len(found.train), runtime.device.type, log, timer))
    if runtime.world > 1:
        dist.broadcast_object_list(chosen, src=0)
    keys, why = chosen
    return dataclasses.replace(config, **keys).with_preset(runtime.device.type), why


def read_data(config, state, log):
    """The training and validation ids (a resumed run's must keep its vocabulary), reported."""
    try:
        found = load_data(config.data, os.path.join(config.out_dir, ".lumina_cache"), config.val_fraction,
                          config.assistant_only_loss, config.seed, Vocab(state["vocab"]) if state else None, log)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    if state and found.new_chars:
        sys.exit(f"error: the data has characters the checkpoint never saw ({''.join(list(found.new_chars)[:20])!r}); "
                 f"resume on the same data, or use fine_tune.py for new data")
    report_data(found, log)
    return found


def choose_precision_and_regularisation(net, config, found, runtime, log):
    """lumina.plan's decisions for this run, written into config so that the checkpoint stores what
    the run used (not "auto"). Returns the model: the same weights rebuilt with dropout layers when
    dropout was chosen for a model built without them."""
    runtime.dtype = plan.choose_dtype(net, config, runtime, log)
    config.dtype = dtype_name(runtime.dtype)
    without_dropout = config.dropout is None
    config.dropout, config.weight_decay = plan.choose_regularisation(net.to(runtime.device), config,
                                                                     len(found.train), runtime, log)
    if not (without_dropout and config.dropout > 0):
        return net
    rebuilt = plan.new_model(config, found.vocab)
    rebuilt.load_state_dict(net.state_dict())
    return rebuilt


def levers(config):
    """The levers that are on, for the model line: a learner sees what this run trains with."""
    named = ["QK-norm"] if config.qk_norm else []
    named += [f"logit soft-cap {config.logit_softcap:g}"] if config.logit_softcap else []
    if 0 < config.short_context < config.seq_length:  # lumina.training draws no phase longer than the context
        named.append(f"the first {config.short_share:.0%} on {config.short_context}-character windows")
    return "".join(f" | {name}" for name in named)


def report_turn_ends(path, prompts, runtime, max_chars, log):
    best = ckpt.build_model(ckpt.load_checkpoint(path))[0].to(runtime.device)
    log(f"{path}: {turn_ends(end_of_turn_rate(best, prompts, runtime.dtype, max_chars=max_chars), prompts)}")


def main(argv):
    asked, flags, _ = parse_cli(argv, CONFIG, __file__, types=TrainConfig.types(), rules=RULES,
                                flags=("resume", "overwrite"))
    # --- runtime ---
    runtime = training.setup_runtime(TrainConfig.from_dict(asked))
    log = print if runtime.is_main else (lambda *a: None)
    files = runfiles.output_files(asked["out_dir"])
    try:
        state = ckpt.load_checkpoint(files["state"]) if flags["resume"] else None
    except ckpt.CheckpointError as e:
        sys.exit(f"error: cannot resume: {e}")
    config = resolve_config(asked, argv, state)
    if runtime.is_main and not state:
        runfiles.keep_previous_run(files, flags["overwrite"], log)
    torch.manual_seed(config.seed)
    log(f"device {runtime.device} | {runtime.world} process(es) | threads {torch.get_num_threads()}")
    # --- data ---
    found = read_data(config, state, log)
    config, why = choose_shape(config, found, runtime, log)
    why = state.get("shape") if state else why  # a resumed run keeps its shape, and why it was chosen
    # --- model ---
    plain = dataclasses.replace(config, dropout=config.dropout or 0.0)  # dropout layers come once it is chosen
    net = ckpt.build_model(state)[0] if state else plan.new_model(plain, found.vocab)
    log(f"model: {net.num_params():,} parameters | {config.num_layers} layers | width {config.hidden_size} | "
        f"context {config.seq_length}" + levers(config) + (f" | resuming from step {state['step']}" if state else ""))
    net = choose_precision_and_regularisation(net, config, found, runtime, log)
    # --- train ---
    trainer = training.Trainer(config, net, found, runtime, files, {"stage": "train", **({"shape": why} if why else {})},
                               compile=plan.choose_compile(config, runtime, log))
    if state:
        trainer.resume(state)
    result = trainer.run()
    log(f"done: {result['steps']} steps in {result['minutes']:.1f} min | best val {result['best_val']:.4f} "
        f"({result['best_val'] / math.log(2):.3f} bits/char) | wrote {files['best']}")
    if runtime.is_main and found.val_prompts:  # chat data: does the saved model end its turns?
        report_turn_ends(files["best"], found.val_prompts, runtime, config.end_chars, log)
    if runtime.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
