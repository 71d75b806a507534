"""Adapting a trained model: LoRA adapters, training only the chat tokens' rows, and vocabulary
expansion for fine-tuning on data with new characters.
"""
import math

import torch
import torch.nn as nn
import torch.nn.utils.parametrize

from lumina.checkpoint import CheckpointError
from lumina.vocab import SPECIAL_TOKENS


# ----------------------------------------------------------------------------------------------
# LoRA: fine-tune a low-rank change to each block matrix, not the matrix
# ----------------------------------------------------------------------------------------------
class LoRA(nn.Module):
    """W -> W + (alpha / rank) * B @ A, with W frozen. B starts at zero, so training starts from
    the base model exactly; A starts random so B's first gradients are not zero (Hu et al., 2021).
    A rank-8 change of a 128 x 384 matrix trains 4,096 numbers instead of 49,152, so it takes more
    data to memorise; on 52 conversations it still cost held-out bits/char (benchmarks/README.md)."""

    def __init__(self, weight, rank, alpha):
        super().__init__()
        self.a = nn.Parameter(torch.randn(rank, weight.shape[1], device=weight.device) / math.sqrt(weight.shape[1]))
        self.b = nn.Parameter(torch.zeros(weight.shape[0], rank, device=weight.device))
        self.scale = alpha / rank

    def forward(self, weight):
        return weight + self.scale * (self.b @ self.a)


def freeze_all_but_new_rows(model, new_rows=0):
    """Freeze every weight except the norms and the embedding rows no base run has trained: the
    special tokens (a base trained on prose never saw <|end|>) and the `new_rows` characters
    fine_tune.py appended. The embedding is tied to the head, so <|end|>'s row is also how the
    model says when a reply is over. The row mask is kept on the parameter as `trained_rows`,
    which also tells the optimizer not to decay the frozen rows."""
    for name, p in model.named_parameters():
        p.requires_grad_("norm" in name or name == "tok_emb.weight")
    embedding = model.tok_emb.weight
    rows = torch.zeros(embedding.shape[0], 1, device=embedding.device)
    rows[:len(SPECIAL_TOKENS)] = 1
    rows[embedding.shape[0] - new_rows:] = 1
    embedding.trained_rows = rows
    embedding.register_hook(lambda grad: grad * rows.to(grad.device, grad.dtype))  # the model may move to a GPU after
    return model


def add_lora(model, rank, alpha):
    """Put a LoRA adapter on every attention and MLP matrix and freeze those matrices."""
    for name, module in model.named_modules():
        if name.startswith("blocks.") and isinstance(module, nn.Linear):
            torch.nn.utils.parametrize.register_parametrization(module, "weight", LoRA(module.weight, rank, alpha))
            module.parametrizations.weight.original.requires_grad_(False)
    return model


def lora_state(model):
    """The adapters alone, by parameter name: what a resumable LoRA state saves beside the base."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".parametrizations.weight.0." in k}


def load_lora(model, adapters, path):
    """Put saved adapters (lora_state) back into a model that add_lora prepared."""
    expected = {name: tensor.shape for name, tensor in lora_state(model).items()}
    if {name: getattr(tensor, "shape", None) for name, tensor in adapters.items()} != expected:
        raise CheckpointError(f"{path}: its LoRA adapters do not match this run's lora_rank; resume with the "
                              f"settings the run started with")
    model.load_state_dict(adapters, strict=False)


# ----------------------------------------------------------------------------------------------
# 6. Vocabulary expansion
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def expand_vocab(model, vocab, new_chars):
    """Append new characters to vocab and model, in place for the model.

    Old rows are copied bit for bit, so old ids keep their meaning and their logits. A new row
    starts as the mean of the character rows: an embedding of the right scale that reads as an
    "average character", rather than zeros (every logit 0) or noise of the wrong size.
    """
    new_vocab = vocab.extended(new_chars)
    added = len(new_vocab) - len(vocab)
    if added == 0:
        return vocab
    old = model.tok_emb.weight
    mean_row = old[len(SPECIAL_TOKENS):].mean(dim=0, keepdim=True)
    weight = torch.cat([old, mean_row.expand(added, -1)]).clone()
    model.tok_emb = nn.Embedding.from_pretrained(weight, freeze=False)
    model.head.weight = model.tok_emb.weight
    model.config.vocab_size = len(new_vocab)
    return new_vocab
