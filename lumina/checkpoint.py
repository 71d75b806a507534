"""The `.pth` contract: save_checkpoint / load_checkpoint, which file a chat stage opens, building
the model from a file, and int8 weights (export.py --int8).
"""
import os
import pickle

import torch

from lumina.data import atomic_write
from lumina.device import pick_device
from lumina.model import CharTransformer, ModelConfig
from lumina.vocab import SPECIAL_TOKENS, Vocab

# ----------------------------------------------------------------------------------------------
# 5. The checkpoint contract
# ----------------------------------------------------------------------------------------------
FORMAT = "luminaai"
FORMAT_VERSION = 3  # 2: SwiGLU gate and value weights fused into one matrix (mlp.up); 3: hashed n-gram tables
OLDEST_READABLE = 2  # a version-2 file is a model without n-grams (ngram_buckets 0), read as it is
MAKER = {"FineTuned_Model.pth": "python fine_tune.py"}  # which script makes a missing file
DEFAULT_CHECKPOINTS = ["FineTuned_Model.pth", "Model.pth"]  # what ChatAI.py and serve.py open by default


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why and what to do."""


def save_checkpoint(path, checkpoint):
    """Write a dict of tensors and plain values atomically; adds the format marker and version."""
    checkpoint = {"format": FORMAT, "format_version": FORMAT_VERSION, **checkpoint}
    try:
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
    except OSError as e:
        raise CheckpointError(f"could not write {path}: {e.strerror or e}; free some disk space or "
                              f"choose another out_dir; the previous file, if any, is intact") from e


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint with weights_only=True, so a file can never run code; every failure is a
    CheckpointError with a one-line message."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found: run `{MAKER.get(name, 'python Train.py')}` first to create it")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise CheckpointError(f"{path} was refused: it holds Python objects that could run code "
                                  f"when loaded, which a LuminaAI checkpoint never does") from None
        raise CheckpointError(f"{path} is corrupt ({e}); retrain or restore it") from None
    except Exception as e:  # garbage bytes can raise any error while parsing; all mean "corrupt"
        first_line = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        raise CheckpointError(f"{path} is truncated or corrupt ({first_line}); retrain or restore it") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a LuminaAI checkpoint (no '{FORMAT}' format marker)")
    if checkpoint.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {checkpoint['format_version']}, newer than this "
                              f"code's {FORMAT_VERSION}: update LuminaAI to read it")
    if checkpoint.get("format_version", 0) < OLDEST_READABLE:
        raise CheckpointError(f"{path} has format_version {checkpoint.get('format_version', 0)}, from an older "
                              f"LuminaAI whose weights are laid out differently: retrain it with `python Train.py`")
    check_weights(path, checkpoint)
    return checkpoint


def check_weights(path, checkpoint):
    """The weights must be exactly those of the model its config describes. Built on the meta
    device, that model costs no memory, and a damaged or edited file fails here, by name, instead
    of deep inside load_state_dict."""
    try:
        with torch.device("meta"):
            expected = CharTransformer(ModelConfig(**checkpoint["model_config"])).state_dict()
        weights, vocab = checkpoint["model"], checkpoint["vocab"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} lacks a usable model config, vocabulary or weights ({e}); "
                              f"retrain or restore it") from None
    scales = checkpoint.get("int8_scales", {})
    for name, tensor in expected.items():
        found = weights.get(name) if isinstance(weights, dict) else None
        int8 = name in scales  # export.py --int8 stores this matrix as int8 rows with one scale each
        if (not isinstance(found, torch.Tensor) or found.shape != tensor.shape
                or (found.dtype == torch.int8) != int8 or not (int8 or found.is_floating_point())):
            raise CheckpointError(f"{path}: weight {name!r} is missing, misshapen or of the wrong type for its own "
                                  f"model config (want {tuple(tensor.shape)} {'int8' if int8 else 'float'}); "
                                  f"retrain, re-export or restore it")
        if int8 and (not isinstance(scales[name], torch.Tensor) or scales[name].shape != tensor.shape[:1]
                     or not scales[name].is_floating_point()):
            raise CheckpointError(f"{path}: the int8 scales of {name!r} are missing or misshapen; re-export it")
    if len(vocab) != checkpoint["model_config"]["vocab_size"] - len(SPECIAL_TOKENS):
        raise CheckpointError(f"{path}: vocabulary of {len(vocab)} characters does not match the model's "
                              f"vocab_size; retrain or restore it")


def build_model(checkpoint):
    """(model, vocab) from a loaded checkpoint, weights included; int8 weights come back as floats."""
    vocab = Vocab(checkpoint["vocab"])
    model = CharTransformer(ModelConfig(**checkpoint["model_config"]))
    model.load_state_dict(dequantize_int8(checkpoint["model"], checkpoint.get("int8_scales", {})))
    return model, vocab


# ----------------------------------------------------------------------------------------------
# int8 weights (export.py --int8): a quarter of the file, every stage that generates reads it
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def quantize_int8(weights):
    """(weights with every matrix as int8, {name: scale per row}). Symmetric and per output row
    (channel): each row's largest weight maps to +-127, so one outlier row costs no other row its
    precision. The embedding is a matrix too (a quarter of the small model); tied matrices stay one
    tensor, stored once. Norm weights and biases are tiny and stay float."""
    out, scales, seen = {}, {}, {}
    for name, w in weights.items():
        if w.ndim != 2 or not w.is_floating_point():
            out[name] = w
            continue
        if w.data_ptr() not in seen:
            scale = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127
            seen[w.data_ptr()] = ((w.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale)
        out[name], scales[name] = seen[w.data_ptr()]
    return out, scales


def dequantize_int8(weights, scales):
    """Float weights from int8 rows and their scales; names without a scale pass through.

    The chat stages compute in float: on the CPUs measured, torch's int8 matmuls were slower than
    fp32 at these small shapes (benchmarks/README.md, "int8"), so int8 is the file, not the math."""
    return {name: w.float() * scales[name][:, None] if name in scales else w for name, w in weights.items()}


def load_for_chat(path, device="auto"):
    """(model in eval mode on the device the rule picks, vocab, checkpoint): what a stage that
    generates needs. Raises CheckpointError or ValueError with a one-line message."""
    device = pick_device(device)
    checkpoint = load_checkpoint(path)
    net, vocab = build_model(checkpoint)
    return net.to(device).eval(), vocab, checkpoint


def model_state(model, merge=True):
    """Weights to save: unwrap torch.compile and DDP so the keys load into a plain model. A matrix
    with a LoRA adapter (add_lora) is saved merged, W + BA, so every stage reads it as a plain
    model; merge=False saves the frozen W instead (a resumable state, whose adapters lora_state
    saves beside it)."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    state = {}
    for name, tensor in model.state_dict().items():
        owner, adapted, rest = name.partition(".parametrizations.")
        if not adapted:
            state[name] = tensor
        elif rest == "weight.original":
            state[owner + ".weight"] = model.get_submodule(owner).weight if merge else tensor
    copies = {}  # one copy per tensor, so tied weights (embedding and head) stay one and are saved once
    for tensor in state.values():
        copies.setdefault(tensor.data_ptr(), tensor.detach().clone())
    return {k: copies[v.data_ptr()] for k, v in state.items()}


def default_checkpoint(path=None):
    """The checkpoint a chat stage opens: the given path, else the fine-tuned model when there is
    one, else Model.pth (whose absence load_checkpoint then explains)."""
    if path:
        return path
    return next((p for p in DEFAULT_CHECKPOINTS if os.path.exists(p)), DEFAULT_CHECKPOINTS[-1])


