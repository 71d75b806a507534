"""fine_tune.py: adapt a trained LuminaAI model to new conversations or text.

Reads  base_model (default Model.pth, from `python Train.py`) and --data: a file or folder in any
       format Train.py accepts (chat JSONL, OASST message rows, <|user|>/<|bot|> text, prose).
Writes output (default FineTuned_Model.pth), which ChatAI.py picks up by default, and beside it
       fine_tune_state.pth (resumable), fine_tune_metrics.jsonl and fine_tune_loss.png.

Characters the base model never saw are added to its vocabulary; old ids and their embedding rows
stay exactly as they were. The architecture always comes from the checkpoint; a training key left
at None below is inherited from the base model's run.

Run:
  python fine_tune.py --data=my_chats.jsonl
  python fine_tune.py --data=spanish.jsonl --max_minutes=2 --max_iters=300   # a tiny CPU example
  python fine_tune.py --resume                       # continue after Ctrl-C
  python fine_tune.py --base_model=FineTuned_Model.pth --output=Round2.pth   # fine-tune again
"""
import math
import os
import sys

import Train
import data
import model as M
from config import ConfigError, check_rules, parse_cli

CONFIG = {
    # --- model and data ---
    "base_model": "Model.pth",         # checkpoint to start from (Train.py's or an earlier fine-tune's)
    "data": "fine_tune_data.jsonl",    # file or folder of new data, in any format Train.py reads
    "output": "FineTuned_Model.pth",   # the best fine-tuned model; its folder also gets the state and metrics
    "overwrite": False,                # allow output == base_model (also: --overwrite)
    "max_new_chars": 64,               # refuse data that would add more new characters (a wrong encoding?)
    "assistant_only_loss": True,       # chat data: learn only the assistant turns; prose always trains on all
    "val_fraction": 0.1,               # share of documents held out to measure before and after
    # --- LoRA ---
    "lora_rank": 0,                    # >0: train a rank-r change to each block matrix (merged at save); 0 = every weight
    "lora_alpha": 16.0,                # the change is scaled by lora_alpha / lora_rank
    # --- training: conservative; None = inherited from the base model's run ---
    "learning_rate": 3e-4,             # lower than pre-training, so the model adapts without forgetting
    "max_iters": 1000,                 # optimizer steps, or until max_minutes
    "max_minutes": 5.0,                # wall-clock budget; 0 = none
    "warmup_ratio": 0.05,              # share of the run spent warming up
    "batch_size": None,                # sequences per micro-batch
    "grad_accum": None,                # micro-batches per step
    "min_lr_ratio": None,              # cosine floor as a share of learning_rate
    "weight_decay": None,              # AdamW decay on matrices
    "beta2": None,                     # AdamW beta2
    "grad_clip": None,                 # max gradient norm; 0 = off
    "label_smoothing": None,           # 0-0.5
    "eval_interval": 100,              # steps between evaluations (and saves of output when val improves)
    "eval_windows": None,              # val windows per evaluation
    "log_interval": 25,                # steps between log lines
    "probe_chars": 80,                 # probe reply length; 0 = none
    "checkpoint_interval": 250,        # steps between resumable saves
    # --- system ---
    "device": "auto",                  # auto, cuda, cuda:N, mps or cpu
    "dtype": "auto",                   # auto, float32, bfloat16 or float16
    "compile": False,                  # torch.compile; pays off only for long runs
    "threads": 0,                      # CPU threads; 0 = one per physical core
    "seed": 1337,                      # data split and sampling
}
TYPES = {k: float if k in ("min_lr_ratio", "weight_decay", "beta2", "grad_clip", "label_smoothing") else int
         for k, v in CONFIG.items() if v is None}
RULES = {**{k: v for k, v in Train.RULES.items() if k in CONFIG}, "lora_rank": (0, 1024), "lora_alpha": (0.0, 10000.0)}


def training_config(config, base):
    """Train.py's config for this run: the base run's values, then every key set here.
    Returns (config, names of inherited keys)."""
    inherited = [k for k, v in config.items() if v is None]
    merged = {**Train.CONFIG, **base["config"], **{k: v for k, v in config.items() if v is not None and k in Train.CONFIG}}
    merged.update({k: base["model_config"][k] for k in ("seq_length", "hidden_size", "num_layers", "nhead", "dropout")})
    merged["out_dir"] = os.path.dirname(os.path.abspath(config["output"]))
    merged["assistant_only_loss"] = config["assistant_only_loss"]
    try:
        return check_rules(merged, Train.RULES), inherited
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def grow_vocabulary(net, vocab, new_chars, limit, log):
    """Append the data's unseen characters to the model (old rows untouched), or refuse when there
    are more than `limit` of them."""
    if len(new_chars) > limit:
        common = sorted(new_chars.items(), key=lambda kv: -kv[1])[:15]
        raise SystemExit(f"error: the data has {len(new_chars)} characters the model never saw, more than "
                         f"max_new_chars={limit}. Most frequent: {', '.join(f'{c!r} x{n}' for c, n in common)}. "
                         f"Check the file's encoding (UTF-8 expected), or raise --max_new_chars")
    if new_chars:
        log(f"vocabulary {len(vocab)} -> {len(vocab) + len(new_chars)}: new "
            + ", ".join(f"{c!r} x{n}" for c, n in sorted(new_chars.items(), key=lambda kv: -kv[1])))
    return M.expand_vocab(net, vocab, list(new_chars))


def report(net, found, config, runtime, label, log):
    """((val loss, end-of-turn rate or None), probe replies) on the held-out fine-tuning data."""
    loss = Train.evaluate(net, found.val, found.val_mask, config, runtime)
    rate = Train.end_of_turn_rate(net, found.val_prompts, runtime) if found.val_prompts else None
    log(f"{label}: val {loss:.4f} | {loss / math.log(2):.3f} bits/char"
        + (f" | {Train.turn_ends(rate, found.val_prompts)}" if found.val_prompts else ""))
    replies = Train.probe_replies(net, found.vocab, config["probe_chars"]) if config["probe_chars"] else []
    return (loss, rate), replies


def main(argv):
    config, flags, _ = parse_cli(argv, CONFIG, __file__, types=TYPES, rules=RULES, flags=("resume",))
    if os.path.abspath(config["output"]) == os.path.abspath(config["base_model"]) and not config["overwrite"]:
        sys.exit(f"error: output {config['output']} is the base model itself; choose another --output, "
                 f"or pass --overwrite to replace it")
    files = Train.output_files(os.path.dirname(os.path.abspath(config["output"])), os.path.basename(config["output"]),
                               prefix="fine_tune")
    # --- checkpoints ---
    try:
        base = M.load_checkpoint(config["base_model"])
        state = M.load_checkpoint(files["state"]) if flags["resume"] else None
    except M.CheckpointError as e:
        sys.exit(f"error: {e}")
    if "int8_scales" in base:
        sys.exit(f"error: {config['base_model']} holds int8 weights (from export.py --int8), and fine-tuning needs "
                 f"float weights: fine-tune the checkpoint it was exported from, then export again")
    train_config, inherited = training_config(config, base)
    runtime = Train.setup_runtime(train_config)
    log = print if runtime.is_main else (lambda *a: None)
    log(f"base model {config['base_model']} (stage {base.get('stage')}) | inherited: "
        + ", ".join(f"{k}={train_config[k]}" for k in inherited))
    log("set here: " + ", ".join(f"{k}={config[k]}" for k in CONFIG if config[k] is not None and k in Train.CONFIG))
    # --- data ---
    net, vocab = M.build_model(state or base)  # a LoRA state holds the base weights; its adapters go on below
    try:
        found = Train.load_data(config["data"], os.path.join(train_config["out_dir"], ".lumina_cache"),
                                config["val_fraction"], config["assistant_only_loss"], config["seed"], vocab, log)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    Train.report_data(found, log)
    if state and found.new_chars:
        sys.exit("error: the data changed since the fine-tune was interrupted; resume with the same --data")
    # --- vocabulary ---
    old_size = len(M.Vocab(base["vocab"]))
    grow_vocabulary(net, vocab, found.new_chars, config["max_new_chars"], log)
    if config["lora_rank"]:
        M.add_lora(net, config["lora_rank"], config["lora_alpha"])
        if state:
            try:
                M.load_lora(net, state["lora"], files["state"])
            except M.CheckpointError as e:
                sys.exit(f"error: cannot resume: {e}")
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        log(f"LoRA rank {config['lora_rank']}: {trainable:,} of {net.num_params():,} parameters train")
    net.to(runtime.device)
    # --- before ---
    before, base_replies = report(net, found, train_config, runtime, "before fine-tuning", log)
    meta = {"stage": "fine_tune", "base_model": os.path.abspath(config["base_model"]), "old_vocab_size": old_size,
            "new_vocab_size": len(found.vocab), "val_loss_before": state["val_loss_before"] if state else before[0],
            "end_rate_before": state.get("end_rate_before") if state else before[1],
            "lora_rank": config["lora_rank"], "lora_alpha": config["lora_alpha"]}
    # --- train ---
    trainer = Train.Trainer(train_config, net, found, runtime, files, meta, end_probes=True)
    if state:
        trainer.resume(state)
    trainer.run()
    # --- after ---
    if runtime.is_main:
        best, _ = M.build_model(M.load_checkpoint(files["best"]))
        after, tuned_replies = report(best.to(runtime.device), found, train_config, runtime, "after fine-tuning", log)
        for (prompt, old), (_, new) in zip(base_replies, tuned_replies):
            log(f"probe | {prompt}\n  base:       {old!r}\n  fine-tuned: {new!r}")
        turns = (f"ends its turn {meta['end_rate_before']:.0%} -> {after[1]:.0%} of {len(found.val_prompts)} held-out "
                 f"replies | " if found.val_prompts else "")
        log(f"val bits/char {meta['val_loss_before'] / math.log(2):.3f} -> {after[0] / math.log(2):.3f} | {turns}"
            f"wrote {config['output']}")


if __name__ == "__main__":
    main(sys.argv[1:])
