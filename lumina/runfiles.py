"""A run's files: where it writes, the earlier run it would replace, its metrics (one JSON line per
log interval and evaluation) and the loss-curve plot. No torch: only files.
"""
import json
import math
import os
import time

from lumina import data


def output_files(out_dir, best="Model.pth", prefix="train"):
    """Where a run writes: the best model, resumable state, metrics and the loss-curve plot."""
    return {"best": os.path.join(out_dir, best), "state": os.path.join(out_dir, f"{prefix}_state.pth"),
            "metrics": os.path.join(out_dir, f"{prefix}_metrics.jsonl"),
            "plot": os.path.join(out_dir, f"{prefix}_loss.png")}


PREVIOUS_RUNS = "previous_runs"  # where a new run moves the files of the run it would replace


def keep_previous_run(files, overwrite, log):
    """A fresh run never destroys an earlier one (Hugging Face's Trainer refuses a non-empty
    output_dir): its files move to previous_runs/<name>-<date>/ beside them and the log says
    where, unless `overwrite`. Returns the folder they went to, or None."""
    present = [path for path in files.values() if os.path.exists(path)]
    if not present:
        return None
    folder = os.path.dirname(present[0])
    if overwrite:
        log(f"--overwrite: replacing the run in {folder}")
        return None
    when = time.localtime(max(os.path.getmtime(path) for path in present))
    stem = os.path.splitext(os.path.basename(files["best"]))[0]
    target = os.path.join(folder, PREVIOUS_RUNS, f"{stem}-{time.strftime('%Y%m%d-%H%M%S', when)}")
    while os.path.exists(target):
        target += "+"
    os.makedirs(target)
    for path in present:
        os.replace(path, os.path.join(target, os.path.basename(path)))
    data.sync_folder(folder)
    log(f"{folder} already holds a run ({last_evaluation(os.path.join(target, os.path.basename(files['metrics'])))}, "
        f"{time.strftime('%Y-%m-%d %H:%M', when)}): moved it to {os.path.relpath(target)}/. To continue that run "
        f"instead, move its files back and pass --resume; --overwrite replaces a run; --out_dir=DIR trains elsewhere")
    return target


def last_evaluation(metrics_path):
    """'step N, val X bits/char' from a run's metrics file, or what it lacks."""
    if not os.path.exists(metrics_path):
        return "no metrics file"
    found = "no evaluation yet"
    for _, record in metric_records(metrics_path):
        if isinstance(record.get("val_bpc"), (int, float)):
            found = f"step {record.get('step')}, val {record['val_bpc']:.3f} bits/char"
    return found


def metric_records(path):
    """(line, record) for each record of a metrics file; a line torn by a crash is skipped."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield line, record


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
        kept = [line if line.endswith("\n") else line + "\n" for line, record in metric_records(path)
                if record.get("step", math.inf) <= last_step]
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
