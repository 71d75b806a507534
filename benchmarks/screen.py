"""Screening Train.py options side by side: run A and run B at the same time, one CPU thread each,
for the same wall-clock budget, on the real text, and compare val bits/char (1,200 windows, as
train_speed.py's part 2). Both share the machine's load, so a difference of a few hundredths is
a lever to keep measuring, not a result: confirm winners with train_speed.py's 10-minute pairs.

Run:  python benchmarks/screen.py --a="" --b="--ngram_buckets=4096" [--minutes=5] [--rounds=1]
"""
import concurrent.futures
import sys
import tempfile

from common import split_text
from lumina.config import parse_cli
from train_speed import run_ours

CONFIG = {
    "a": "",           # Train.py options of run A ("" = the defaults)
    "b": "",           # Train.py options of run B
    "minutes": 5.0,    # budget of each run
    "rounds": 1,       # pairs, one after another
}


def main(argv):
    settings = parse_cli(argv, CONFIG, __file__)[0]
    data = split_text(tempfile.mkdtemp(prefix="lumina-screen-"))
    for round_ in range(settings["rounds"]):
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(run_ours, data, tempfile.mkdtemp(prefix="lumina-screen-"), settings["minutes"], {},
                                "false", 1200, ["--threads=1", *settings[side].split()]) for side in ("a", "b")]
            a, b = (run.result() for run in runs)
        print(f"round {round_ + 1}, {settings['minutes']:g} min, 1 thread each: A {settings['a'] or 'defaults'} "
              f"{a['val_bpc']:.3f} ({a['steps']} steps) | B {settings['b'] or 'defaults'} {b['val_bpc']:.3f} "
              f"({b['steps']} steps) | B - A {b['val_bpc'] - a['val_bpc']:+.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
