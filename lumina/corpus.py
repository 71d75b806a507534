"""The training data as ids: read and split (data.py), encoded (vocab.py) and cached on disk, the
held-out prompts of the end-of-turn rate, and the windows a step or an evaluation reads.
"""
import dataclasses
import hashlib
import json
import os

import numpy as np
import torch

from lumina import data
from lumina.vocab import Vocab, encode_documents, render_chat

CACHE_VERSION = 5  # 3: the cache also holds the held-out prompts; 4: every answered user turn is a prompt;
                   # 5: strict UTF-8, and lines with NUL or lone surrogates skipped
END_PROBES = 32    # held-out prompts the end-of-turn rate samples at most (chat data only)


@dataclasses.dataclass
class Data:
    train: torch.Tensor        # int32 ids
    train_mask: torch.Tensor   # bool: loss counts at this target
    val: torch.Tensor
    val_mask: torch.Tensor
    vocab: Vocab
    new_chars: dict            # characters absent from base_vocab -> count
    problems: list             # "file:line: reason" for every skipped line
    val_prompts: list = dataclasses.field(default_factory=list)  # held-out chats' openings, for the end-of-turn rate


def cache_key(path, val_fraction, assistant_only, seed, base_vocab):
    """Everything the encoded arrays depend on: each file's name and content, and the settings."""
    if not os.path.exists(path):
        return "none"  # training_documents explains the missing path
    train_files, val_files = data.split_files(path)
    files = [(os.path.basename(f), data.sha256_file(f)) for f in train_files + val_files + data.prepared_pair_files(path)]
    settings = [CACHE_VERSION, files, len(train_files), val_fraction, assistant_only, seed, base_vocab and base_vocab.chars]
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]


def encode_data(path, val_fraction, assistant_only, seed, base_vocab):
    """Read and split the documents (data.py), build the vocabulary and encode them (vocab.py), as
    the numpy arrays the cache holds."""
    problems = []
    train_docs, val_docs = data.training_documents(path, val_fraction, seed, problems)
    counts = data.document_chars(train_docs + val_docs) + data.pair_chars(data.prepared_pair_files(path))
    vocab = base_vocab.extended(sorted(counts)) if base_vocab else Vocab(sorted(counts))
    new_chars = {c: counts[c] for c in vocab.chars[len(base_vocab.chars):]} if base_vocab else {}
    train, train_mask = encode_documents(train_docs, vocab, assistant_only)
    val, val_mask = encode_documents(val_docs or train_docs, vocab, assistant_only)
    prompts = held_out_prompts(val_docs, vocab)
    return dict(train=train, train_mask=train_mask, val=val, val_mask=val_mask,
                prompts=np.array([i for p in prompts for i in p], dtype=np.int32),
                prompt_lengths=np.array([len(p) for p in prompts], dtype=np.int64),
                vocab=np.array(vocab.chars, dtype=str), new_chars=np.array(list(new_chars), dtype=str),
                new_counts=np.array(list(new_chars.values()), dtype=np.int64), problems=np.array(problems, dtype=str))


def held_out_prompts(documents, vocab, limit=END_PROBES):
    """Up to `limit` held-out chats cut before each assistant turn, rendered for a reply: the
    prompts on which the end-of-turn rate is measured (every answered turn, not only the first:
    a few held-out chats give enough prompts to choose on)."""
    prompts = [render_chat(doc[:i], vocab, add_generation_prompt=True)[0] for kind, doc in documents if kind == "chat"
               for i, message in enumerate(doc) if message["role"] == "assistant" and i > 0]
    return prompts[:limit]


def load_data(path, cache_dir, val_fraction, assistant_only, seed, base_vocab=None, log=print):
    """The training and validation ids, from the cache made from the same inputs when there is
    one. The vocabulary is base_vocab extended by any new characters, or built from the data."""
    cache = os.path.join(cache_dir, f"tokens-{cache_key(path, val_fraction, assistant_only, seed, base_vocab)}.npz")
    if os.path.exists(cache):
        log(f"data: reusing the encoded cache {cache}")
        with np.load(cache) as saved:
            arrays = dict(saved)
    else:
        arrays = encode_data(path, val_fraction, assistant_only, seed, base_vocab)
        data.atomic_write(cache, lambda tmp: np.savez(tmp, **arrays))
    ends = np.cumsum(arrays["prompt_lengths"]).tolist()
    prompts = [arrays["prompts"][end - n:end].tolist() for end, n in zip(ends, arrays["prompt_lengths"].tolist())]
    return Data(torch.from_numpy(arrays["train"]), torch.from_numpy(arrays["train_mask"]), torch.from_numpy(arrays["val"]),
                torch.from_numpy(arrays["val_mask"]), Vocab(arrays["vocab"].tolist()),
                dict(zip(arrays["new_chars"].tolist(), arrays["new_counts"].tolist())), arrays["problems"].tolist(), prompts)


def report_data(found, log):
    for problem in found.problems[:20]:
        log(f"skipped {problem}")
    if len(found.problems) > 20:
        log(f"... and {len(found.problems) - 20} more skipped lines")
    log(f"data: {len(found.train):,} train ids, {len(found.val):,} val ids, vocabulary {len(found.vocab)} "
        f"({len(found.problems)} lines skipped)")


def windows(ids, mask, starts, seq_length):
    """(inputs (n, T), targets (n, T), before (n, 2)) for windows beginning at `starts`: masked
    targets are -1, and `before` holds the two ids preceding each window (-1 before the start)."""
    idx = starts[:, None] + torch.arange(-2, seq_length + 1)  # (n, 2 + T + 1)
    chunk = ids[idx.clamp(min=0)].long().masked_fill(idx < 0, -1)
    return chunk[:, 2:-1], chunk[:, 3:].masked_fill(~mask[idx[:, 3:]], -1), chunk[:, :2]


def random_windows(ids, mask, n, seq_length, generator):
    """n training windows at random positions: every position is equally likely on every step."""
    seq_length = min(seq_length, len(ids) - 1)
    starts = torch.randint(len(ids) - seq_length, (n,), generator=generator)
    return windows(ids, mask, starts, seq_length)
