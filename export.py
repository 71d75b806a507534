"""export.py: turn a trained checkpoint into files for deployment, and run the ONNX one.

Reads  a checkpoint (Model.pth, FineTuned_Model.pth...) given as the path.
Writes, beside it unless --out says where:
       Model.int8.pth   --int8: the weight matrices as int8 with one scale per row, about a quarter
                        of the file; ChatAI.py and serve.py read it like any checkpoint
       Model.onnx       --onnx: one generation step (the ids of the step and the KV cache in, the
                        logits and the new cache out), with the vocabulary and chat template in its
                        metadata, so onnxruntime can chat without PyTorch or the .pth file

Run:
  python export.py Model.pth --int8
  python export.py Model.pth --onnx                     # needs: pip install -r requirements-export.txt
  python export.py Model.onnx --prompt "Hello!"         # a reply from onnxruntime alone (numpy, no torch)
  python export.py --help                               # every key, with its comment and default
"""
import json
import os
import sys

import numpy as np

from lumina import data
from lumina.config import parse_cli

CONFIG = {
    # --- what to write ---
    "int8": False,          # write the int8 checkpoint (also: --int8)
    "onnx": False,          # write the ONNX graph (also: --onnx)
    "out": None,            # output path; None = beside the input, as NAME.int8.pth or NAME.onnx
    # --- chatting with a .onnx file through onnxruntime ---
    "prompt": None,         # a message: print the model's reply to it and exit
    "max_new_chars": 400,   # longest reply, in characters
    "temperature": 0.0,     # 0 = greedy (the likeliest character); else sample
    "top_k": 40,            # when sampling: among the k likeliest characters
    "seed": None,           # an int makes sampled replies reproducible
    "threads": 1,           # onnxruntime threads; one stream of a small model runs best on one
}
TYPES = {"out": str, "prompt": str, "seed": int}
RULES = {"temperature": (0.0, 2.0), "top_k": (1, 10 ** 6), "max_new_chars": (1, 10 ** 6), "threads": (1, 1024)}
OPSET = 18
# PyTorch is imported only by the two export functions: the ONNX chat below needs numpy and
# onnxruntime alone, as it would on a machine that serves the .onnx file.


# ----------------------------------------------------------------------------------------------
# int8
# ----------------------------------------------------------------------------------------------
def export_int8(path, out):
    from lumina import checkpoint as ckpt
    checkpoint = ckpt.load_checkpoint(path)
    if "int8_scales" in checkpoint:
        raise ckpt.CheckpointError(f"{path} already holds int8 weights; export from the float checkpoint")
    checkpoint["model"], checkpoint["int8_scales"] = ckpt.quantize_int8(checkpoint["model"])
    checkpoint["stage"] = f"{checkpoint.get('stage', 'train')}, int8"
    ckpt.save_checkpoint(out, {k: v for k, v in checkpoint.items() if k not in ("format", "format_version")})
    before, after = os.path.getsize(path), os.path.getsize(out)
    return f"wrote {out}: {after / 1e6:.2f} MB, {after / before:.0%} of {path}'s {before / 1e6:.2f} MB"


# ----------------------------------------------------------------------------------------------
# ONNX: the graph, and the metadata that makes it self-contained
# ----------------------------------------------------------------------------------------------
def export_onnx(path, out):
    import torch
    from lumina.vocab import END, ROLE_TOKENS, SPECIAL_TOKENS, UNK
    from lumina.checkpoint import load_for_chat
    from lumina.engine import StepGraph
    try:
        import onnx  # noqa: F401  (the dynamo exporter also needs onnxscript)
        import onnxscript  # noqa: F401
    except ImportError:
        raise SystemExit("error: ONNX export needs onnx and onnxscript: pip install -r requirements-export.txt") from None
    net, vocab, checkpoint = load_for_chat(path, "cpu")
    config = net.config
    head_dim = config.hidden_size // config.nhead
    # Example inputs of 3 new ids after 2 cached positions; both lengths are dynamic in the graph.
    ids, before = torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)
    past = torch.zeros(config.num_layers, 2, 1, config.nhead, 2, head_dim)
    dynamic = torch.export.Dim.DYNAMIC
    with torch.no_grad():
        program = torch.onnx.export(StepGraph(net).eval(), (ids, past, before), dynamo=True, opset_version=OPSET,
                                    input_names=["ids", "past", "before"], output_names=["logits", "present"],
                                    dynamic_shapes={"ids": {1: dynamic}, "past": {4: dynamic}, "before": None},
                                    verbose=False)
    metadata = {"luminaai.vocab": json.dumps(vocab.itos), "luminaai.seq_length": str(config.seq_length),
                "luminaai.chat_template": json.dumps({"roles": ROLE_TOKENS, "end": END, "unk": UNK,
                                                      "first_char_id": len(SPECIAL_TOKENS)}),
                "luminaai.source": os.path.basename(path), "luminaai.stage": str(checkpoint.get("stage", "?"))}
    program.model.metadata_props.update(metadata)
    try:
        data.atomic_write(out, program.save)
    except OSError as e:
        raise SystemExit(f"error: could not write {out}: {e.strerror or e}; the previous file, if any, is intact")
    return f"wrote {out}: {os.path.getsize(out) / 1e6:.2f} MB, opset {OPSET}, vocabulary {len(vocab)}"


# ----------------------------------------------------------------------------------------------
# Chatting with the .onnx file: numpy and onnxruntime, nothing else
# ----------------------------------------------------------------------------------------------
def window_start(length, seq_length):
    """engine.window_start's rule, restated here because this side has no torch: while the text
    fits the model sees all of it; past that, the most recent 3/4 of a window, re-read once per
    quarter window (tests/test_export.py checks the two agree)."""
    if length <= seq_length:
        return 0
    stride = seq_length + 1 - max(1, seq_length * 3 // 4)
    return (1 + (length - seq_length - 1) // stride) * stride


def predecessors(ids, first):
    """engine.predecessors, restated: the two ids before ids[first], -1 for none."""
    return ([-1, -1] + ids[max(0, first - 2):first])[-2:]


class OnnxChat:
    """A model exported with --onnx, run by onnxruntime: its vocabulary, chat template and window
    come from the file's metadata."""

    def __init__(self, path, threads=1):
        import onnxruntime
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if "luminaai.vocab" not in meta:
            raise ValueError(f"{path} was not written by export.py --onnx (no LuminaAI metadata)")
        self.itos, self.seq_length = json.loads(meta["luminaai.vocab"]), int(meta["luminaai.seq_length"])
        self.template = json.loads(meta["luminaai.chat_template"])
        self.stoi = {c: i for i, c in enumerate(self.itos) if i >= self.template["first_char_id"]}
        layers, _, _, nhead, _, head_dim = self.session.get_inputs()[1].shape
        self.empty = np.zeros((layers, 2, 1, nhead, 0, head_dim), dtype=np.float32)
        # A model without n-grams ignores `before`, and the exporter drops an unused input.
        self.takes_before = any(i.name == "before" for i in self.session.get_inputs())

    def prompt_ids(self, messages):
        """The chat template: <|role|>text<|end|> per message, then <|bot|> for the reply."""
        ids = []
        for message in messages:
            ids += [self.template["roles"][message["role"]]]
            ids += [self.stoi.get(c, self.template["unk"]) for c in message["content"]] + [self.template["end"]]
        return ids + [self.template["roles"]["assistant"]]

    def step(self, ids, past, before=(-1, -1)):
        """(logits of the next id, the new cache) after reading `ids` on top of `past`; `before`:
        the two ids that precede ids in the text."""
        feed = {"ids": np.array([ids], dtype=np.int64), "past": past}
        if self.takes_before:
            feed["before"] = np.array([before], dtype=np.int64)
        logits, present = self.session.run(None, feed)
        return logits[0, -1], present

    def generate(self, ids, max_new, temperature=0.0, top_k=40, seed=None, stop_ids=None):
        """Yield new ids until a turn ends (or a stop id) or max_new: greedy at temperature 0, else
        top-k sampling."""
        rng, ids, window = np.random.default_rng(seed), list(ids), None
        stops = set(stop_ids) if stop_ids is not None else {self.template["end"], *self.template["roles"].values()}
        for _ in range(max_new):
            start = window_start(len(ids), self.seq_length)
            if start != window:  # the first step, or a re-read of the most recent window
                logits, past = self.step(ids[start:], self.empty, predecessors(ids, start))
                window = start
            else:
                logits, past = self.step(ids[-1:], past, predecessors(ids, len(ids) - 1))
            ids.append(int(logits.argmax()) if temperature == 0 else self.sample(logits, temperature, top_k, rng))
            yield ids[-1]
            if ids[-1] in stops:
                return

    @staticmethod
    def sample(logits, temperature, top_k, rng):
        top = np.argsort(logits)[::-1][:top_k]
        probs = np.exp((logits[top] - logits[top[0]]) / temperature)
        return int(top[rng.choice(len(top), p=probs / probs.sum())])

    def reply(self, text, **sampling):
        ids = list(self.generate(self.prompt_ids([{"role": "user", "content": text}]), **sampling))
        return "".join(self.itos[i] for i in ids if i >= self.template["first_char_id"])


# ----------------------------------------------------------------------------------------------
def output_path(path, config, suffix):
    out = config["out"] or os.path.splitext(path)[0] + suffix
    if os.path.abspath(out) == os.path.abspath(path):
        raise SystemExit(f"error: --out={out} would overwrite the input; choose another path")
    return out


def main(argv):
    config, _, paths = parse_cli(argv, CONFIG, __file__, types=TYPES, rules=RULES, positional=1)
    if not paths:
        sys.exit("error: give the checkpoint to export, e.g. python export.py Model.pth --int8")
    path = paths[0]
    if path.endswith(".onnx"):
        if config["prompt"] is None:
            sys.exit("error: with a .onnx file, say what to ask: --prompt \"Hello!\"")
        try:
            chat = OnnxChat(path, config["threads"])
        except ImportError:
            sys.exit("error: running a .onnx file needs onnxruntime: pip install -r requirements-export.txt")
        except Exception as e:  # onnxruntime raises its own types for a missing or damaged file
            sys.exit(f"error: cannot run {path}: {str(e).strip().splitlines()[0]}")
        print(chat.reply(config["prompt"], max_new=config["max_new_chars"], temperature=config["temperature"],
                         top_k=config["top_k"], seed=config["seed"]))
        return
    if not (config["int8"] or config["onnx"]) or (config["int8"] and config["onnx"]):
        sys.exit("error: say what to write: --int8 or --onnx (one at a time, so --out names one file)")
    from lumina.checkpoint import CheckpointError
    try:
        if config["int8"]:
            print(export_int8(path, output_path(path, config, ".int8.pth")))
        else:
            print(export_onnx(path, output_path(path, config, ".onnx")))
    except CheckpointError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
