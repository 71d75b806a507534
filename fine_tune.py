"""fine_tune.py: adapt a trained LuminaAI model to new conversations or text.

Reads  base_model (default Model.pth, from `python Train.py`) and --data: a file or folder in any
       format Train.py accepts (chat JSONL, OASST message rows, <|user|>/<|bot|> text, prose).
Writes output (default FineTuned_Model.pth), which ChatAI.py picks up by default, and beside it
       files named after it: FineTuned_Model_state.pth (resumable), FineTuned_Model_metrics.jsonl and
       FineTuned_Model_loss.png. A run that would replace another's files moves them to
       previous_runs/ first and says where (--overwrite replaces them).

Characters the base model never saw are added to its vocabulary; old ids and their embedding rows
stay exactly as they were. The architecture always comes from the checkpoint; a training key left
at None below is inherited from the base model's run.

Run:
  python fine_tune.py --data=my_chats.jsonl           # teaches the chat's form: the model learns to end its turn
  python fine_tune.py --data=spanish.jsonl --train=all --epochs=3   # new content: every weight learns
  python fine_tune.py --resume                       # continue after Ctrl-C, with that run's config
  python fine_tune.py --base_model=FineTuned_Model.pth --output=Round2.pth   # fine-tune again
"""
import math
import os
import sys

import torch

from lumina import data
from lumina.adapt import add_lora, expand_vocab, freeze_all_but_new_rows, load_lora
from lumina.checkpoint import CheckpointError, build_model, load_checkpoint
from lumina.config import ConfigError, apply_overrides, parse_cli
from lumina.corpus import load_data, report_data
from lumina.device import dtype_name
from lumina.evaluate import end_of_turn_rate, evaluate, probe_replies, replies_per_prompt, turn_ends
from lumina.plan import RULES as TRAINING_RULES, SHAPE_KEYS, TrainConfig, choose_compile, choose_dtype
from lumina.preference import DPO, load_pairs
from lumina.runfiles import keep_previous_run, output_files
from lumina.training import Trainer, setup_runtime
from lumina.vocab import SPECIAL_TOKENS, Vocab

CONFIG = {
    # --- model and data ---
    "base_model": "Model.pth",         # checkpoint to start from (Train.py's or an earlier fine-tune's)
    "data": "fine_tune_data.jsonl",    # file or folder of new data, in any format Train.py reads
    "output": "FineTuned_Model.pth",   # the best fine-tuned model; its folder also gets the state and metrics
    "overwrite": False,                # allow output == base_model, and replace an earlier run's files instead of
                                       #   moving them to previous_runs/ (also: --overwrite)
    "max_new_chars": 64,               # refuse data that would add more new characters (a wrong encoding?)
    "assistant_only_loss": True,       # chat data: learn only the assistant turns; prose always trains on all
    "end_weight": 3.0,                 # sft: the loss weight of each <|end|> against a character's 1 (measured: 1 ended
                                       #   72% of held-out replies, 2 91%, 3 98%; benchmarks/README.md, "Preference")
    "val_fraction": 0.1,               # share of documents (or of pair trees) held out to measure before and after
    # --- objective ---
    "objective": "auto",               # sft: learn the data's text; dpo: learn from preference pairs (Rafailov et al.
                                       #   2023); auto: dpo when --data is a pairs file, else sft (a folder from
                                       #   Dataset_download.py holds both: it gives sft unless --objective=dpo)
    "beta": 5.0,                       # dpo: how far the model may move from where it started; smaller moves further
                                       #   (5 suits per-character rewards; the paper's 0.1 suits summed ones)
    "per_char": True,                  # dpo: compare the replies' log-probabilities per character, not summed (summed,
                                       #   a char model learns that longer is better and stops ending its turns)
    "score_end": False,                # dpo: score each reply's closing <|end|> too (measured: DPO then learns to end
                                       #   less; the end of a turn is the supervised step's lesson)
    # --- what learns (benchmarks/README.md, "Fine-tuning": chat_tokens won) ---
    "train": "chat_tokens",            # chat_tokens: only the rows of the chat tokens (<|end|>...) and of new
                                       #   characters, and the norms: the model learns the chat's form and keeps
                                       #   what it knew; lora: those plus a low-rank change to every block matrix;
                                       #   all: every weight (a few dozen conversations are then memorised)
    "lora_rank": 8,                    # train=lora: rank of each matrix's change (merged into plain weights at save)
    "lora_alpha": 16.0,                # train=lora: the change is scaled by lora_alpha / lora_rank
    # --- training: conservative; None = inherited from the base model's run ---
    "learning_rate": 0.0,              # 0 = the rate that suits `train` (LEARNING_RATES below)
    "epochs": 5.0,                     # passes over the training data: sets max_iters from the data's size; 0 = use max_iters
    "max_iters": 1000,                 # optimizer steps when epochs is 0, or until max_minutes
    "max_minutes": None,               # wall-clock budget; None = the one measured for the objective (MINUTES); 0: none
    "warmup_ratio": 0.05,              # share of the run spent warming up
    "batch_size": None,                # sequences per micro-batch
    "grad_accum": None,                # micro-batches per step
    "min_lr_ratio": None,              # cosine floor as a share of learning_rate
    "weight_decay": None,              # AdamW decay on matrices
    "beta2": None,                     # AdamW beta2
    "grad_clip": None,                 # max gradient norm; 0 = off
    "label_smoothing": None,           # 0-0.5
    "eval_interval": 0,                # steps between evaluations (and saves of output when it improves); 0 = 4 per run
    "eval_windows": None,              # val windows per evaluation
    "log_interval": 25,                # steps between log lines
    "probe_chars": 80,                 # probe reply length; 0 = none
    "end_chars": 2000,                 # a held-out reply still open after this many characters never ended its turn
    "checkpoint_interval": 250,        # steps between resumable saves
    # --- system ---
    "device": "auto",                  # auto, cuda, cuda:N, mps or cpu
    "dtype": "auto",                   # auto, float32, bfloat16 or float16
    "compile": "auto",                 # torch.compile: auto (Train.py's rule), true or false
    "threads": 0,                      # CPU threads; 0 = one per physical core
    "seed": 1337,                      # data split and sampling
}
FLOATS = ("min_lr_ratio", "weight_decay", "beta2", "grad_clip", "label_smoothing", "max_minutes")
TYPES = {k: float if k in FLOATS else int
         for k, v in CONFIG.items() if v is None}
LEARNING_RATES = {"chat_tokens": 5e-3, "lora": 1e-3, "all": 3e-4}  # measured: benchmarks/README.md, "Fine-tuning"
MINUTES = {"sft": 5.0, "dpo": 2.0}  # DPO: the budget measured with DPO_RATE_SHARE (README, "Preference")
DPO_RATE_SHARE = 0.2  # DPO at the supervised rate moved val +0.08 bits/char; a fifth, +0.002 (README, "Preference")
EVALUATIONS = 4  # per run when eval_interval is 0: each also samples the held-out replies (seconds)
RULES = {**{k: v for k, v in TRAINING_RULES.items() if k in CONFIG}, "train": ("chat_tokens", "lora", "all"),
         "learning_rate": (0.0, 10.0), "epochs": (0.0, 1000.0), "eval_interval": (0, math.inf),
         "lora_rank": (1, 1024), "lora_alpha": (0.0, 10000.0), "objective": ("auto", "sft", "dpo"),
         "beta": (1e-6, 100.0), "end_weight": (0.0, 1000.0)}


def training_config(config, base):
    """The run's TrainConfig: the base run's values (a key the base file lacks as TrainConfig.OLD_RUNS
    says), then every key set here. Returns (TrainConfig, names of inherited keys)."""
    inherited = [k for k, v in config.items() if v is None]
    merged = {**TrainConfig.OLD_RUNS, **{k: base["config"][k] for k in inherited if k in base["config"]},
              **{k: v for k, v in config.items() if v is not None}}
    merged.update({k: base["model_config"].get(k, 0) for k in SHAPE_KEYS})  # a file of format 2 has no n-grams
    merged["out_dir"] = os.path.dirname(os.path.abspath(config["output"]))
    merged["assistant_only_loss"] = config["assistant_only_loss"]
    merged["optimizer"] = "adamw"  # the recipes (benchmarks/README.md, "Fine-tuning") were measured with AdamW
    merged["short_context"] = 0  # a phase of short windows is pretraining's: fine-tuning reads whole chats
    merged["learning_rate"] = config["learning_rate"] or LEARNING_RATES[config["train"]] * (
        DPO_RATE_SHARE if config["objective"] == "dpo" else 1.0)
    merged["eval_interval"] = config["eval_interval"] or 1  # set from the data's size in budget()
    try:
        return TrainConfig.from_dict(merged), inherited
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def budget(train_config, config, found, log):
    """max_iters from `epochs` and the training data's size (characters, or pairs for DPO), and
    eval_interval for EVALUATIONS."""
    if config["epochs"]:
        per_step = train_config.batch_size * train_config.grad_accum
        size, unit = (len(found.train), "pairs") if config["objective"] == "dpo" else (len(found.train), "characters")
        per_step *= 1 if unit == "pairs" else train_config.seq_length
        train_config.max_iters = max(1, math.ceil(config["epochs"] * size / per_step))
        log(f"budget: {config['epochs']:g} epochs of {size:,} {unit} = {train_config.max_iters} steps"
            + (f", or {config['max_minutes']:g} minutes if sooner" if config["max_minutes"] else ""))
    if not config["eval_interval"]:
        train_config.eval_interval = max(1, math.ceil(train_config.max_iters / EVALUATIONS))


def choose_objective(config, log):
    """sft or dpo: what --objective says, or for auto what --data holds; and that objective's budget."""
    if config["objective"] == "auto":
        config["objective"] = "dpo" if os.path.isfile(config["data"]) and data.pair_files(config["data"]) else "sft"
        log(f"objective auto: {config['objective']} ({'preference pairs' if config['objective'] == 'dpo' else 'text'} "
            f"in {config['data']})")
    if config["max_minutes"] is None:
        config["max_minutes"] = MINUTES[config["objective"]]


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
    return expand_vocab(net, vocab, list(new_chars))


def choose_trainable(net, config, new_rows, state, state_path, log):
    """What learns (the `train` key), and on a resumed LoRA run its saved adapters."""
    if config["train"] != "all":
        freeze_all_but_new_rows(net, new_rows)
    if config["train"] == "lora":
        add_lora(net, config["lora_rank"], config["lora_alpha"])
        if state:
            try:
                load_lora(net, state["lora"], state_path)
            except CheckpointError as e:
                sys.exit(f"error: cannot resume: {e}")
    rows = f"the rows of the {len(SPECIAL_TOKENS)} chat tokens and {new_rows} new characters, the norms"
    what = {"all": "every weight", "chat_tokens": rows, "lora": f"{rows} and rank-{config['lora_rank']} LoRA adapters"}
    trainable = sum(int(p.trained_rows.sum()) * p.shape[1] if hasattr(p, "trained_rows") else p.numel()
                    for p in net.parameters() if p.requires_grad)
    log(f"training {what[config['train']]}: {trainable:,} of {net.num_params():,} parameters")


def report(net, found, train_config, runtime, objective, label, log):
    """((val loss, end-of-turn rate or None, pair accuracy or None), probe replies) on the held-out data."""
    loss = evaluate(net, found.val, found.val_mask, train_config, runtime)
    rate = (end_of_turn_rate(net, found.val_prompts, runtime.dtype, max_chars=train_config.end_chars)
            if found.val_prompts else None)
    pairs = objective.metrics(net, runtime) if objective else {}
    log(f"{label}: val {loss:.4f} | {loss / math.log(2):.3f} bits/char"
        + "".join(f" | {name.replace('_', ' ')} {value:.3f}" for name, value in pairs.items())
        + (f" | {turn_ends(rate, found.val_prompts)}" if found.val_prompts else ""))
    chars = train_config.probe_chars
    replies = probe_replies(net, found.vocab, chars, runtime.dtype) if chars else []
    return (loss, rate, pairs.get("pair_accuracy")), replies


def run_files(output):
    """The run's files, named after its output: R2.pth gets R2_state.pth, R2_metrics.jsonl and
    R2_loss.png, so a second fine-tune never writes over the first's."""
    folder, name = os.path.split(os.path.abspath(output))
    return output_files(folder, name, prefix=os.path.splitext(name)[0])


SAME_ON_RESUME = ("base_model", "data", "output")  # a resumed run must read and write what it did


def resumed_config(config, argv, state):
    """--resume: the interrupted run's config with this command line on top (as Train.py does), so a
    bare --resume continues a LoRA or DPO run as it was. Another base model, data or output is
    refused by name: the saved optimizer and reference belong to those."""
    saved = state.get("fine_tune_config")
    if saved is None:  # a state file from before runs recorded their config
        return config
    try:
        config = apply_overrides({**CONFIG, **saved}, [a for a in argv if a != "--resume"], TYPES)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    for key in SAME_ON_RESUME:
        if os.path.abspath(config[key]) != saved[key]:
            sys.exit(f"error: cannot resume: the interrupted run's {key} was {saved[key]}, not {config[key]}; resume "
                     f"with the same --{key}, or start a new run without --resume")
    return config


def open_checkpoints(config, argv, files, resume):
    """(config, base checkpoint, resumable state or None), or an exit with the reason."""
    try:
        state = load_checkpoint(files["state"]) if resume else None
        if state:
            config = resumed_config(config, argv, state)
        if os.path.abspath(config["output"]) == os.path.abspath(config["base_model"]) and not config["overwrite"]:
            sys.exit(f"error: output {config['output']} is the base model itself; choose another --output, "
                     f"or pass --overwrite to replace it")
        base = load_checkpoint(config["base_model"])
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    if "int8_scales" in base:
        sys.exit(f"error: {config['base_model']} holds int8 weights (from export.py --int8), and fine-tuning needs "
                 f"float weights: fine-tune the checkpoint it was exported from, then export again")
    for key, digest in (fingerprints(config).items() if state else ()):
        if state.get("fingerprints", {}).get(key, digest) != digest:
            sys.exit(f"error: cannot resume: {config[key]} changed since the run was interrupted (its sha256 differs); "
                     f"resume with the files it had, or start a new run without --resume")
    return config, base, state


def fingerprints(config):
    """The sha256 of the base model and of the data, which a resumed run must find unchanged."""
    return {"base_model": data.sha256_file(config["base_model"]), "data": data.files_digest(config["data"])}


def read_data(config, train_config, vocab, state, log):
    """The new data, in the base vocabulary extended by its new characters: ids of text and chats,
    or for DPO the windows that score each pair's two replies."""
    try:
        if config["objective"] == "dpo":
            found = load_pairs(config["data"], config["val_fraction"], config["seed"], vocab, train_config.seq_length,
                               config["assistant_only_loss"])
            report_pairs(found, log)
        else:
            found = load_data(config["data"], os.path.join(train_config.out_dir, ".lumina_cache"),
                              config["val_fraction"], config["assistant_only_loss"], config["seed"], vocab, log)
            report_data(found, log)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    if state and found.new_chars:
        sys.exit("error: the data changed since the fine-tune was interrupted; resume with the same --data")
    return found


def report_pairs(found, log):
    for problem in found.problems[:20]:
        log(f"skipped {problem}")
    log(f"data: {len(found.train):,} preference pairs, {len(found.val_pairs):,} held out | {found.trimmed} prompts "
        f"lost their oldest turns to fit the window | {len(found.problems)} lines skipped")


def make_objective(config, found, net, runtime, state):
    """None for sft (the Trainer's next-character objective); for dpo the pairs' objective, its
    reference log-probabilities from the starting model (or the interrupted run's state)."""
    if config["objective"] != "dpo":
        return None
    for module in net.modules():  # the policy must score as the reference did: no dropout (as TRL does)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    objective = DPO(found, config["beta"], config["per_char"], config["score_end"])
    objective.prepare(net, runtime, state.get("objective") if state else None)
    return objective


def run_meta(config, found, old_size, state, before):
    """What the fine-tuned checkpoint records beside the weights: its base, vocabulary sizes, the
    held-out figures before (kept from the first start when resumed) and what trained."""
    lora = {"lora_rank": config["lora_rank"], "lora_alpha": config["lora_alpha"]} if config["train"] == "lora" else {}
    dpo = {**{k: config[k] for k in ("beta", "per_char", "score_end")},
           "pair_accuracy_before": state["pair_accuracy_before"] if state else before[2]} \
        if config["objective"] == "dpo" else {}
    saved = {**{k: config[k] for k in CONFIG}, **{k: os.path.abspath(config[k]) for k in SAME_ON_RESUME}}
    return {"stage": "fine_tune", "base_model": os.path.abspath(config["base_model"]), "old_vocab_size": old_size,
            "fine_tune_config": saved, "fingerprints": fingerprints(config),
            "new_vocab_size": len(found.vocab), "val_loss_before": state["val_loss_before"] if state else before[0],
            "end_rate_before": state.get("end_rate_before") if state else before[1], "train": config["train"],
            "objective": config["objective"], **lora, **dpo}


def report_after(files, found, train_config, runtime, objective, meta, base_replies, log):
    """The saved model against the base: held-out figures and probe replies, side by side."""
    best, _ = build_model(load_checkpoint(files["best"]))
    after, tuned_replies = report(best.to(runtime.device), found, train_config, runtime, objective, "after fine-tuning",
                                  log)
    for (prompt, old, old_logprob), (_, new, new_logprob) in zip(base_replies, tuned_replies):
        log(f"probe | {prompt}\n  base:       {old!r} | mean log-prob {old_logprob:.2f}/char"
            f"\n  fine-tuned: {new!r} | mean log-prob {new_logprob:.2f}/char")
    pairs = f"pair accuracy {meta['pair_accuracy_before']:.1%} -> {after[2]:.1%} | " if objective else ""
    replies = len(found.val_prompts) * replies_per_prompt(found.val_prompts)
    turns = (f"ends its turn {meta['end_rate_before']:.0%} -> {after[1]:.0%} of {replies} held-out replies | "
             if found.val_prompts else "")
    log(f"val bits/char {meta['val_loss_before'] / math.log(2):.3f} -> {after[0] / math.log(2):.3f} | {pairs}{turns}"
        f"wrote {files['best']}")


def main(argv):
    config, flags, _ = parse_cli(argv, CONFIG, __file__, types=TYPES, rules=RULES, flags=("resume",))
    files = run_files(config["output"])
    config, base, state = open_checkpoints(config, argv, files, flags["resume"])
    choose_objective(config, print)
    train_config, inherited = training_config(config, base)
    runtime = setup_runtime(train_config)
    torch.manual_seed(train_config.seed)  # the same seed, the same LoRA start and dropout: the same run
    log = print if runtime.is_main else (lambda *a: None)
    if runtime.is_main and not state:
        keep_previous_run(files, config["overwrite"], log)
    log(f"base model {config['base_model']} (stage {base.get('stage')}) | inherited: "
        + ", ".join(f"{k}={getattr(train_config, k)}" for k in inherited))
    log("set here: " + ", ".join(f"{k}={getattr(train_config, k)}" for k in CONFIG if config[k] is not None and k in TRAINING_RULES))
    # --- data ---
    net, vocab = build_model(state or base)  # a LoRA state holds the base weights; its adapters go on below
    found = read_data(config, train_config, vocab, state, log)
    budget(train_config, config, found, log)
    # --- vocabulary, and what learns ---
    old_size = len(Vocab(base["vocab"]))
    grow_vocabulary(net, vocab, found.new_chars, config["max_new_chars"], log)
    choose_trainable(net, config, net.config.vocab_size - old_size, state, files["state"], log)
    net.to(runtime.device)
    runtime.dtype = choose_dtype(net, train_config, runtime, log)
    train_config.dtype = dtype_name(runtime.dtype)
    # --- before, train, after ---
    objective = make_objective(config, found, net, runtime, state)
    before, base_replies = report(net, found, train_config, runtime, objective, "before fine-tuning", log)
    meta = run_meta(config, found, old_size, state, before)
    trainer = Trainer(train_config, net, found, runtime, files, meta, end_probes=True, objective=objective,
                      compile=choose_compile(train_config, runtime, log))
    if state:
        trainer.resume(state)
    trainer.run()
    if runtime.is_main:
        report_after(files, found, train_config, runtime, objective, meta, base_replies, log)


if __name__ == "__main__":
    main(sys.argv[1:])
