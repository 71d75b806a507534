"""export.py's files against the fp32 checkpoint they come from: file size, val bits/char, and chat
characters/s (eager, one thread, at full context: the window already full, so re-reads count),
every way taking turns, the best of each kept.

Ways to run the model:
  fp32          model.generate on the float checkpoint (ChatAI's path)
  int8 file     the checkpoint from export.py --int8, read by model.py (int8 storage, float math)
  int8 dynamic  torch.ao's quantize_dynamic on the Linear layers: int8 matmuls (the x86/fbgemm
                engine), with activations quantized on the fly: int8 math
  int8 packed   torch._weight_int8pack_mm: int8 weights times float activations: int8 math
  onnxruntime   export.py --onnx, run by export.OnnxChat (numpy + onnxruntime, no torch)
  torchao ...   torchao's int8 weight-only and dynamic configs, when torchao is importable

Two shapes: the trained checkpoint given (the default CPU preset), where bits/char are measured on
held-out text, and the GPU preset's shape with random weights (size and speed do not depend on
the weights, so no bits/char there).

Run:  python benchmarks/export_speed.py --checkpoint=Model.pth [--rounds=3] [--chars=200]
      (with torchao: pip install --no-deps --target DIR torchao, then PYTHONPATH=DIR)
"""
import dataclasses
import math
import os
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

import common
import export
from lumina import data, engine
from lumina.checkpoint import build_model, load_checkpoint, model_state, quantize_int8, save_checkpoint
from lumina.config import parse_cli
from lumina.device import seeded_generator
from lumina.model import CharTransformer, ModelConfig
from lumina.plan import PRESETS
from lumina.vocab import SPECIAL_TOKENS, Vocab, encode_documents

CONFIG = {
    "checkpoint": "Model.pth",  # a trained checkpoint of the default CPU preset
    "rounds": 3,                # turns taken by every way; the best of each is kept
    "chars": 200,               # characters generated per measurement
    "eval_windows": 200,        # held-out windows for bits/char
    "threads": 1,               # ChatAI's default
}
HELD_OUT = os.path.join(os.path.dirname(common.TEXT), "oasst1_validation_en_sample.messages.jsonl")


class PackedInt8Linear(torch.nn.Module):
    """A Linear with int8 weights and per-row scales, through torch's own weight-only int8 matmul."""

    def __init__(self, linear):
        super().__init__()
        weights, scales = quantize_int8({"w": linear.weight.detach()})  # the same int8 as export.py's
        self.weight, self.scale = weights["w"], scales["w"]

    def forward(self, x):
        return torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scale).view(*x.shape[:-1], -1)


def int8_variants(path):
    """{way: model} for the torch ways of running `path`."""
    fp32 = build_model(load_checkpoint(path))[0].eval()
    folder = tempfile.mkdtemp()
    int8_path = os.path.join(folder, "Model.int8.pth")
    export.export_int8(path, int8_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its successor, torchao
        dynamic = torch.ao.quantization.quantize_dynamic(build_model(load_checkpoint(path))[0].eval(),
                                                         {torch.nn.Linear}, dtype=torch.qint8)
    packed = build_model(load_checkpoint(path))[0].eval()
    for block in packed.blocks:
        for parent, name in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "up"), (block.mlp, "proj")):
            setattr(parent, name, PackedInt8Linear(getattr(parent, name)))
    packed.head = PackedInt8Linear(packed.head)
    models = {"fp32": fp32, "int8 file": build_model(load_checkpoint(int8_path))[0].eval(),
              "int8 dynamic": dynamic, "int8 packed": packed}
    try:  # torchao, when installed (it is no requirement): its own int8 CPU paths, measured the same way
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
        for way, config in (("torchao weight", Int8WeightOnlyConfig()), ("torchao dynamic", Int8DynamicActivationInt8WeightConfig())):
            models[way] = build_model(load_checkpoint(path))[0].eval()
            quantize_(models[way], config)
    except ImportError:
        pass
    return models, int8_path


@torch.inference_mode()
def bits_per_char(run, ids, windows, T):
    """Mean bits/char of run(x (1, T) ids) -> (logits, _) over evenly spaced held-out windows."""
    starts = torch.linspace(0, len(ids) - T - 2, windows).long().tolist()
    loss = sum(F.cross_entropy(run(torch.from_numpy(ids[s:s + T]).long()[None])[0][0],
                               torch.from_numpy(ids[s + 1:s + T + 1]).long(), reduction="sum") for s in starts)
    return float(loss) / (windows * T) / math.log(2)


def chars_per_second(generate, prompt, n):
    start = time.perf_counter()
    count = sum(1 for _ in generate(prompt, n))
    return count / (time.perf_counter() - start)


def measure(path, settings, held_out_ids=None):
    """Sizes, bits/char (when held_out_ids) and chars/s of every way of running `path`."""
    models, int8_path = int8_variants(path)
    onnx_path = os.path.join(os.path.dirname(int8_path), "Model.onnx")
    export.export_onnx(path, onnx_path)
    onnx = export.OnnxChat(onnx_path, settings["threads"])
    config = models["fp32"].config
    prompt = torch.randint(len(SPECIAL_TOKENS), config.vocab_size, (config.seq_length,),
                           generator=seeded_generator(0)).tolist()
    ways = {way: (lambda net: lambda p, n: engine.generate(net, p, n, 1.0, 40, stop_ids=(), seed=0))(net)
            for way, net in models.items()}
    ways["onnxruntime"] = lambda p, n: onnx.generate(p, n, 1.0, 40, seed=0, stop_ids=())
    speed = {}
    for _ in range(settings["rounds"]):
        for way, generate in ways.items():
            speed[way] = max(speed.get(way, 0.0), chars_per_second(generate, prompt, settings["chars"]))
    sizes = {"fp32": os.path.getsize(path), "int8 file": os.path.getsize(int8_path), "onnxruntime": os.path.getsize(onnx_path)}
    print(f"{'way':<14} {'file MB':>8} {'vs fp32':>8} {'bits/char':>10} {'chars/s':>8} {'vs fp32':>8}")
    for way in ways:
        run = models.get(way) or (lambda x: (torch.from_numpy(onnx.session.run(None, {"ids": x.numpy(), "past": onnx.empty})[0]), None))
        bpc = f"{bits_per_char(run, held_out_ids, settings['eval_windows'], config.seq_length):.3f}" if held_out_ids is not None else "-"
        size = sizes.get(way)
        megabytes, share = (f"{size / 1e6:.2f}", f"{size / sizes['fp32']:.0%}") if size else ("-", "-")
        print(f"{way:<14} {megabytes:>8} {share:>8} {bpc:>10} {speed[way]:>8.0f} {speed[way] / speed['fp32']:>7.2f}x")


def main(argv):
    settings = parse_cli(argv, CONFIG, __file__)[0]
    torch.set_num_threads(settings["threads"])
    print(f"torch {torch.__version__} | threads {settings['threads']} | {settings['chars']} chars at full context, "
          f"best of {settings['rounds']}")
    checkpoint = load_checkpoint(settings["checkpoint"])
    vocab = Vocab(checkpoint["vocab"])
    documents = [("prose", row["text"]) for _, row in data.read_jsonl(HELD_OUT, []) if row.get("text")]
    ids, _ = encode_documents(documents, vocab, assistant_only=False)
    print(f"\n{settings['checkpoint']} ({CharTransformer(ModelConfig(**checkpoint['model_config'])).num_params():,} "
          f"parameters), bits/char on {settings['eval_windows']} windows of the OASST1 validation sample")
    measure(settings["checkpoint"], settings, ids)
    shape = {k: v for k, v in PRESETS["gpu"].items() if k in ("hidden_size", "num_layers", "nhead", "seq_length")}
    net = CharTransformer(ModelConfig(vocab_size=len(vocab), **shape))
    path = os.path.join(tempfile.mkdtemp(), "Model.pth")
    save_checkpoint(path, {"stage": "random", "vocab": vocab.chars, "model": model_state(net),
                             "model_config": dataclasses.asdict(net.config), "config": {}, "metrics": {}})
    print(f"\nGPU preset's shape {shape}, random weights ({net.num_params():,} parameters), on this CPU")
    measure(path, settings)


if __name__ == "__main__":
    main(sys.argv[1:])
