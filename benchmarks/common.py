"""What the benchmarks share: the real text, split as ref_gpt.py splits it. Options are parsed by
the project's own config.py, like every script's."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TEXT = os.path.join(ROOT, "..", "shared", "data", "oasst1", "oasst1_train_en_text.jsonl")


def split_text(folder):
    """train.jsonl / validation.jsonl in `folder`: the real text's rows, the last 5% held out."""
    if not os.path.exists(TEXT):
        raise SystemExit(f"{TEXT} is absent: this benchmark needs ../shared/data/oasst1")
    with open(TEXT, encoding="utf-8") as f:
        rows = f.readlines()
    cut = int(len(rows) * 0.95)
    for name, part in (("train.jsonl", rows[:cut]), ("validation.jsonl", rows[cut:])):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.writelines(part)
    return folder
