"""Which position scheme and MLP train best per second? The measurement behind model.py's choice.

Each variant trains for the same wall-clock budget through Train.train (the real loop), at the CPU
preset's shape, on the real text (../shared/data/oasst1/oasst1_train_en_text.jsonl, last 5% of
rows held out), and reports val bits/char. Variants swap one piece of model.py's transformer:
  rotary+swiglu  model.py as it is: rotary positions on queries and keys, SwiGLU MLP (8/3x width)
  learned+swiglu a learned table of absolute positions added to the embeddings instead of rotary
  rotary+gelu    GELU MLP (4x width), so the parameter count matches
  rotary+relu2   squared-ReLU MLP (4x width), cheaper than GELU on CPU

Run:  python benchmarks/arch_choice.py [--minutes=2.5]
"""
import math
import os
import sys
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import split_text  # noqa: E402  (common puts the project on sys.path)
from lumina.config import parse_cli  # noqa: E402
from lumina.corpus import load_data  # noqa: E402
from lumina.model import CharTransformer, ModelConfig  # noqa: E402
from lumina.plan import PRESETS, TrainConfig  # noqa: E402
from lumina.runfiles import output_files  # noqa: E402
from lumina.training import Runtime, Trainer  # noqa: E402

CONFIG = {
    "minutes": 2.5,  # training time of each variant
}


class LearnedPositions(nn.Module):
    """The token embedding plus a learned table of absolute positions (nanoGPT's scheme). It keeps
    the token embedding's own weight, so the output head stays tied to it."""

    def __init__(self, tok_emb, config):
        super().__init__()
        self.tok, self.pos = tok_emb, nn.Embedding(config.seq_length, config.hidden_size)
        nn.init.normal_(self.pos.weight, std=0.02)

    @property
    def weight(self):
        return self.tok.weight

    def forward(self, idx):
        return self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))


class GELU(nn.Module):
    def __init__(self, config, activation=F.gelu):
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, 4 * config.hidden_size, bias=False)
        self.proj = nn.Linear(4 * config.hidden_size, config.hidden_size, bias=False)
        self.activation = activation

    def forward(self, x):
        return self.proj(self.activation(self.fc(x)))


def build(variant, config):
    torch.manual_seed(0)
    net = CharTransformer(config)
    if variant.startswith("learned"):
        net.tok_emb = LearnedPositions(net.tok_emb, config)
        net.cos.fill_(1.0)  # a rotation by angle 0 leaves queries and keys as they are
        net.sin.zero_()
    for block in net.blocks:
        if variant.endswith("+gelu"):
            block.mlp = GELU(config)
        if variant.endswith("relu2"):
            block.mlp = GELU(config, activation=lambda x: F.relu(x).square())
    return net


def main(argv):
    minutes = parse_cli(argv, CONFIG, __file__)[0]["minutes"]
    work = tempfile.mkdtemp(prefix="lumina-arch-")
    split_text(work)
    runtime = Runtime(torch.device("cpu"), torch.float32)
    train_config = TrainConfig(**PRESETS["cpu"], max_minutes=minutes, max_iters=10 ** 9, eval_interval=10 ** 9,
                               probe_chars=0, eval_windows=600, log_interval=10 ** 9, out_dir=work)
    found = load_data(work, os.path.join(work, "cache"), 0.05, False, train_config.seed)
    shape = ModelConfig(vocab_size=len(found.vocab),
                        **{k: getattr(train_config, k) for k in ("seq_length", "hidden_size", "num_layers", "nhead")})
    print(f"preset {shape}, {minutes} min each, fp32, {torch.get_num_threads()} threads")
    for variant in ("rotary+swiglu", "learned+swiglu", "rotary+gelu", "rotary+relu2"):
        net = build(variant, shape)
        files = output_files(work, prefix=variant.replace("+", "_"))
        result = Trainer(train_config, net, found, runtime, files, {"stage": "bench"}).run()
        print(f"{variant:<16} {sum(p.numel() for p in net.parameters()):>10,} params | {result['steps']:>6} steps | "
              f"val {result['val_loss'] / math.log(2):.3f} bits/char", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
