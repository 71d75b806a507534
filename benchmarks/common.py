"""What the benchmarks share: option parsing and the real text, split as ref_gpt.py splits it."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(ROOT, "..", "shared", "data", "oasst1", "oasst1_train_en_text.jsonl")


def parse_options(argv, defaults):
    """--key=value options, typed like their defaults."""
    options = dict(defaults)
    for arg in argv:
        key, _, value = arg.lstrip("-").partition("=")
        if key not in options:
            raise SystemExit(f"unknown option {arg}; options: {', '.join(options)}")
        options[key] = value.lower() == "true" if isinstance(options[key], bool) else type(options[key])(value)
    return options


def split_text(folder):
    """train.jsonl / validation.jsonl in `folder`: the real text's rows, the last 5% held out."""
    if not os.path.exists(TEXT):
        raise SystemExit(f"{TEXT} is absent: this benchmark needs ../shared/data/oasst1")
    rows = open(TEXT, encoding="utf-8").readlines()
    cut = int(len(rows) * 0.95)
    for name, part in (("train.jsonl", rows[:cut]), ("validation.jsonl", rows[cut:])):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.writelines(part)
    return folder
