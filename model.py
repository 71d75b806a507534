"""model.py: the one module every LuminaAI stage shares.

It defines, once:
  1. the character vocabulary, with special tokens no typed text can produce;
  2. the chat template that turns a conversation into ids (training and chat both use it);
  3. a small decoder-only transformer (pre-norm, SDPA attention, tied embeddings, KV cache);
  4. sampling and streaming, KV-cached generation;
  5. the `.pth` checkpoint contract: save_checkpoint / load_checkpoint, and which one a stage opens;
  6. vocabulary expansion for fine-tuning;
  7. the device rule every stage follows.

Importing it has no side effects:  python -c "import model"

Design choice, measured (benchmarks/arch_choice.py, README "Choosing the architecture"): rotary
positions and a SwiGLU MLP. At the CPU preset, each trained for the same 2.5 minutes, val bits/char
was 2.241 for rotary + SwiGLU, 2.263 rotary + squared ReLU, 2.375 rotary + GELU and 2.688 for a
learned position table + GELU.
"""
import dataclasses
import math
import os
import pickle
import types

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize

from data import atomic_write

# ----------------------------------------------------------------------------------------------
# 1. Vocabulary
# ----------------------------------------------------------------------------------------------
SPECIAL_TOKENS = ["<|unk|>", "<|user|>", "<|bot|>", "<|end|>", "<|system|>"]
UNK, USER, BOT, END, SYSTEM = range(len(SPECIAL_TOKENS))
ROLE_TOKENS = {"user": USER, "assistant": BOT, "system": SYSTEM}
TURN_ENDS = (END, USER, BOT, SYSTEM)  # a reply ends at <|end|>, or where the model opens another turn


class Vocab:
    """Ids 0-4 are the special tokens; every later id is one character.

    Special tokens are ids, never strings: encode() looks at one character at a time, so text that
    spells "<|bot|>" becomes seven ordinary characters and can never forge a turn.
    """

    def __init__(self, chars):
        self.chars = list(chars)
        if len(set(self.chars)) != len(self.chars) or any(len(c) != 1 for c in self.chars):
            raise ValueError("a vocabulary is a list of distinct single characters")
        self.itos = SPECIAL_TOKENS + self.chars
        self.stoi = {c: i for i, c in enumerate(self.chars, start=len(SPECIAL_TOKENS))}

    @classmethod
    def from_text(cls, texts):
        """Build from a string or an iterable of strings; ids follow sorted character order."""
        chars = set()
        for text in [texts] if isinstance(texts, str) else texts:
            chars.update(text)
        return cls(sorted(chars))

    def __len__(self):
        return len(self.itos)

    def encode(self, text):
        """Characters to ids. Unknown characters become UNK; unknown_chars() names them."""
        return [self.stoi.get(c, UNK) for c in text]

    def unknown_chars(self, text):
        """The characters of `text` this vocabulary lacks, in order of first appearance."""
        return list(dict.fromkeys(c for c in text if c not in self.stoi))

    def decode(self, ids):
        """Ids to text; special ids print as their names, e.g. <|end|>."""
        return "".join(self.itos[i] for i in ids)

    def extended(self, new_chars):
        """A new Vocab with `new_chars` appended: every old id keeps its meaning."""
        return Vocab(self.chars + [c for c in dict.fromkeys(new_chars) if c not in self.stoi])


# ----------------------------------------------------------------------------------------------
# 2. The chat template
# ----------------------------------------------------------------------------------------------
# A conversation renders as  <|user|>hi<|end|><|bot|>hello!<|end|>  ... A newline inside a message
# is an ordinary character; only <|end|> closes a turn.

def render_chat(messages, vocab, add_generation_prompt=False):
    """Render [{"role", "content"}, ...] to (ids, loss_mask).

    loss_mask[i] is True where id i belongs to an assistant turn (its text and its <|end|>), the
    part a chatbot is trained to produce. add_generation_prompt appends <|bot|> so the model replies.
    """
    ids, mask = [], []
    for message in messages:
        role = message["role"]
        if role not in ROLE_TOKENS:
            raise ValueError(f"unknown chat role {role!r}: use user, assistant or system")
        body = vocab.encode(message["content"]) + [END]
        ids += [ROLE_TOKENS[role]] + body
        mask += [False] + [role == "assistant"] * len(body)
    if add_generation_prompt:
        ids.append(BOT)
        mask.append(False)
    return ids, mask


REPLY_RESERVE = 4  # when old turns must go, keep 1/4 of the window free for the reply


def turns_to_drop(messages, vocab, seq_length, pinned=0):
    """How many messages after the first `pinned` (a system prompt) to drop, oldest first and whole,
    so that the rendered prompt leaves a quarter of the window for the reply. The newest message
    always stays; a turn is never cut in half."""
    budget = seq_length * (REPLY_RESERVE - 1) // REPLY_RESERVE
    dropped = 0
    while pinned + dropped < len(messages) - 1:
        ids, _ = render_chat(messages[:pinned] + messages[pinned + dropped:], vocab, add_generation_prompt=True)
        if len(ids) <= budget:
            break
        dropped += 1
    return dropped


def parse_chat(ids, vocab):
    """Inverse of render_chat: ids back to a list of messages (a trailing open turn is kept)."""
    roles = {token: role for role, token in ROLE_TOKENS.items()}
    messages = []
    for i in ids:
        if i in roles:
            messages.append({"role": roles[i], "content": ""})
        elif i != END and messages:
            messages[-1]["content"] += vocab.itos[i]
    return messages


def encode_documents(documents, vocab, assistant_only):
    """data.py's documents -> one int32 array of ids and a bool array, True where the next-id loss
    counts. Chats go through the template; prose (and, unless assistant_only, every turn) trains."""
    ids, mask = [], []
    for kind, doc in documents:
        if kind == "chat":
            doc_ids, doc_mask = render_chat(doc, vocab)
            mask += doc_mask if assistant_only else [True] * len(doc_ids)
        else:
            doc_ids = vocab.encode(doc + "\n\n")  # a blank line between paragraphs, as in the file
            mask += [True] * len(doc_ids)
        ids += doc_ids
    return np.array(ids, dtype=np.int32), np.array(mask, dtype=bool)


# ----------------------------------------------------------------------------------------------
# 3. The transformer
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ModelConfig:
    vocab_size: int
    seq_length: int = 256     # context window, in characters
    hidden_size: int = 256    # width of the residual stream
    num_layers: int = 4
    nhead: int = 4            # attention heads; hidden_size must divide evenly
    dropout: float = 0.0      # on the residual branches only; attention dropout is 4.5x slower on CPU

    def __post_init__(self):
        if self.hidden_size % self.nhead or (self.hidden_size // self.nhead) % 2:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be nhead ({self.nhead}) times an even "
                             f"head size, because rotary positions rotate pairs of numbers")


def rotary_tables(seq_length, head_dim, base=10000.0):
    """cos and sin tables, each (seq_length, head_dim), for apply_rotary. Pair i of a head (features
    i and i + head_dim/2) turns at frequency base^(-i / (head_dim/2)): fast pairs tell near
    positions apart, slow ones far. sin carries the rotation's sign: -sin for the first halves."""
    half = head_dim // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float32) / half)
    angles = torch.outer(torch.arange(seq_length, dtype=torch.float32), freqs)
    return torch.cat([angles.cos(), angles.cos()], dim=-1), torch.cat([-angles.sin(), angles.sin()], dim=-1)


def apply_rotary(x, cos, sin):
    """Rotate each pair (a, b) = (x[..., i], x[..., i + half]) of x (..., head_dim) by its angle:
    (a cos - b sin, b cos + a sin). Rolling x by half a head puts b beside a, so the whole rotation
    is two products and a sum. The dot product of a rotated query and key then depends only on how
    far apart they are, not where they sit."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # under autocast, keep q and k in bf16/fp16, not fp32
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class KVCache:
    """Keys and values of every layer for several sequences at once, preallocated to the window.

    k[layer] has shape (slots, nhead, seq_length, head_dim): one slot per sequence being generated.
    lengths[slot] counts the positions filled in that slot; each sequence advances on its own.
    """

    def __init__(self, config, slots=1, device="cpu", dtype=torch.float32):
        shape = (slots, config.nhead, config.seq_length, config.hidden_size // config.nhead)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.lengths = [0] * slots  # plain ints: the bookkeeping of a step should not launch tensor ops

    def step(self, slots, T, device):
        """Where a forward pass of T new positions in `slots` reads and writes: see CacheStep."""
        return CacheStep(self, slots, T, device)

    def attend(self, layer, step, k, v):
        """Write the new keys and values (B, nhead, T, head_dim) at each row's next positions in its
        slot; return every key and value the rows may see, and the mask that says which."""
        if step.rows is None:
            (slot,), (start,), T = step.slots, step.starts, k.shape[2]
            self.k[layer][slot, :, start:start + T] = k[0]
            self.v[layer][slot, :, start:start + T] = v[0]
            return self.k[layer][slot:slot + 1, :, :step.end], self.v[layer][slot:slot + 1, :, :step.end], step.mask
        self.k[layer][step.slot_index, :, step.positions] = k.transpose(1, 2)  # indexed as (B, T, nhead, head_dim)
        self.v[layer][step.slot_index, :, step.positions] = v.transpose(1, 2)
        return self.k[layer][step.rows, :, :step.end], self.v[layer][step.rows, :, :step.end], step.mask


class PastKV:
    """One sequence's keys and values passed in and handed back rather than written in place: the
    cache of an exported graph (export.py --onnx), where a step is a pure function.

    past has shape (layers, 2, 1, nhead, P, head_dim) for P positions read so far (P may be 0);
    after a forward pass of T ids, present() has the same layout with P + T positions.
    """

    def __init__(self, past):
        self.past, self.presents = past, []
        self.lengths = [past.shape[-2]]

    def step(self, slots, T, device):
        start = self.past.shape[-2]
        # Always a mask, even for one new id: a branch on T would not survive export.
        mask = torch.ones(T, start + T, dtype=torch.bool, device=device).tril(diagonal=start)
        return types.SimpleNamespace(slots=[0], starts=[start], end=start + T, positions=None, mask=mask)

    def attend(self, layer, step, k, v):
        k, v = torch.cat([self.past[layer, 0], k], dim=2), torch.cat([self.past[layer, 1], v], dim=2)
        self.presents.append(torch.stack([k, v]))
        return k, v, step.mask

    def present(self):
        return torch.stack(self.presents)


class StepGraph(nn.Module):
    """One generation step as a pure function, the form export.py hands to the ONNX exporter:
    (ids (1, T), past (layers, 2, 1, nhead, P, head_dim)) -> (logits (1, T, vocab), present)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, past):
        cache = PastKV(past)
        logits, _ = self.model(ids, cache=cache)
        return logits, cache.present()


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.nhead = config.nhead
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, rotary, cache=None, layer=0, step=None):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.nhead, C // self.nhead)
        # Rotate queries and keys together, then (B, T, nhead, head_dim) -> (B, nhead, T, head_dim).
        q, k = apply_rotary(qkv[:, :, :2], *rotary).transpose(1, 3).unbind(dim=2)
        v = qkv[:, :, 2].transpose(1, 2)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v, mask = cache.attend(layer, step, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class CacheStep:
    """Where one forward pass reads and writes in a KVCache: the same for every layer, so it is
    worked out once per pass. Row b's new query t sits at absolute position starts[b] + t and may
    see the keys up to there. One sequence (every chat step) needs no index tensors, and no mask
    for a single new position; a batch of sequences of different lengths reads up to the longest
    and masks each row's unfilled tail."""

    def __init__(self, cache, slots, T, device):
        self.slots, self.starts = slots, [cache.lengths[s] for s in slots]
        self.end = max(self.starts) + T
        self.rows = self.positions = self.mask = None
        if len(slots) == 1 and T > 1:
            self.mask = torch.ones(T, self.end, dtype=torch.bool, device=device).tril(diagonal=self.starts[0])
        elif len(slots) > 1:
            # Rows in a run of neighbouring slots read their keys through a view; others are gathered.
            contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
            self.rows = slice(slots[0], slots[0] + len(slots)) if contiguous else torch.tensor(slots, device=device)
            self.slot_index = torch.tensor(slots, device=device)[:, None]
            self.positions = torch.tensor(self.starts, device=device)[:, None] + torch.arange(T, device=device)  # (B, T)
            self.mask = (torch.arange(self.end, device=device) <= self.positions[:, :, None])[:, None]  # (B, 1, T, end)


class MLP(nn.Module):
    """SwiGLU: a SiLU-gated product of two projections. Its width is 8/3 of the stream, so it has
    the parameters of a 4x GELU MLP; it trained better per second than GELU or squared ReLU."""

    def __init__(self, config):
        super().__init__()
        width = 8 * config.hidden_size // 3
        self.up = nn.Linear(config.hidden_size, 2 * width, bias=False)  # gate and value in one matmul
        self.proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, x):
        gate, value = self.up(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * value)


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)). The residual path is never normalised."""

    def __init__(self, config):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(config.hidden_size), nn.LayerNorm(config.hidden_size)
        self.attn, self.mlp = CausalSelfAttention(config), MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, rotary, cache=None, layer=0, step=None):
        x = x + self.drop(self.attn(self.norm1(x), rotary, cache, layer, step))
        return x + self.drop(self.mlp(self.norm2(x)))


class CharTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.hidden_size)
        # Positions enter as rotations of queries and keys (rotary), not as a learned table:
        # fixed tables, so they are buffers and never saved.
        # Shaped (seq_length, 1, 1, head_dim) to broadcast over (batch, T, q/k, nhead, head_dim).
        cos, sin = rotary_tables(config.seq_length, config.hidden_size // config.nhead)
        self.register_buffer("cos", cos[:, None, None, :], persistent=False)
        self.register_buffer("sin", sin[:, None, None, :], persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied: one matrix reads and writes characters
        self.apply(self._init_weights)
        # Each residual branch adds to the stream; scale their outputs so depth keeps variance flat.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.num_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, cache=None, label_smoothing=0.0, slots=None):
        """idx (B, T) ids -> logits (B, T, vocab). With targets, also the mean loss over targets
        that are not -1 (masked). With a cache, row b of idx continues the positions cached in
        slot slots[b] (default: slot b)."""
        T = idx.shape[1]
        step = None if cache is None else cache.step(slots or list(range(idx.shape[0])), T, idx.device)
        end = step.end if step else T
        if end > self.config.seq_length:
            raise ValueError(f"{end} positions exceed the context window of {self.config.seq_length}")
        if step is None or step.positions is None:  # every row at the same position: a slice
            start = step.starts[0] if step else 0
            rotary = (self.cos[start:start + T], self.sin[start:start + T])
        else:  # each row its own positions: (B, T, 1, 1, head_dim)
            rotary = (self.cos[step.positions], self.sin[step.positions])
        x = self.drop(self.tok_emb(idx))
        for layer, block in enumerate(self.blocks):
            x = block(x, rotary, cache, layer, step)
        if cache is not None:
            for s in step.slots:
                cache.lengths[s] += T
        logits = self.head(self.norm(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, label_smoothing=label_smoothing)
        return logits, loss


# ----------------------------------------------------------------------------------------------
# 4. Sampling and generation
# ----------------------------------------------------------------------------------------------
REPETITION_WINDOW = 64  # at the character level every letter recurs, so penalise recent ids only


def sample(logits, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
           recent_ids=(), generator=None):
    """Pick the next id from 1-D logits. Pure: it never changes its inputs.

    temperature 0 is greedy argmax; top_k keeps the k most likely ids; top_p keeps the smallest
    set of ids whose probability mass reaches p; repetition_penalty > 1 makes `recent_ids` rarer.
    """
    logits = logits.detach().float()
    if repetition_penalty != 1.0 and len(recent_ids):
        seen = torch.tensor(list(set(recent_ids)), dtype=torch.long, device=logits.device)
        chosen = logits[seen]
        # Dividing a negative logit would raise it, so negative logits are multiplied instead.
        # index_put (not index_put_) makes a new tensor: the caller's logits stay as they were.
        logits = logits.index_put((seen,), torch.where(chosen > 0, chosen / repetition_penalty,
                                                       chosen * repetition_penalty))
    if temperature == 0:
        return int(logits.argmax())
    ids = None  # None: position i of `logits` is id i; else ids[i] is its id
    if top_k is not None and top_k < logits.numel():
        logits, ids = logits.topk(top_k)  # only the k survivors go on, most likely first
    probs = F.softmax(logits / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        if ids is None:
            probs, ids = probs.sort(descending=True)
        mass_before = probs.cumsum(0) - probs
        probs = probs.masked_fill(mass_before >= top_p, 0.0)  # everything after the mass has reached p
    choice = int(torch.multinomial(probs, 1, generator=generator))
    return choice if ids is None else int(ids[choice])


def window_start(length, seq_length):
    """First id the model sees when the text is `length` ids long.

    The context-window rule: while the text fits, the model sees all of it. When it outgrows the
    window, the oldest ids are dropped so that the most recent 3/4 of a window remain, and the
    model re-reads them in one pass. Re-reading only once per quarter window keeps the cost per new
    character nearly flat, and the rule depends on lengths alone, so cached and uncached
    generation see exactly the same text.
    """
    if length <= seq_length:
        return 0
    keep = max(1, seq_length * 3 // 4)
    stride = seq_length + 1 - keep  # ids added between two re-reads
    rereads = 1 + (length - seq_length - 1) // stride
    return rereads * stride


@dataclasses.dataclass
class Row:
    """One sequence being generated: its ids so far, how to sample it, and its KV-cache slot.

    A chat uses one row; a server runs many rows through one model, each with its own settings and
    random generator, so a reply does not depend on what else is being generated beside it."""
    ids: list                  # the prompt, then every id generated so far
    max_new_tokens: int
    slot: int = 0              # which slot of the KVCache holds this row's keys and values
    temperature: float = 0.8
    top_k: int = None
    top_p: float = None
    repetition_penalty: float = 1.0
    generator: torch.Generator = None
    stop_ids: tuple = (END,)
    new: int = 0               # ids generated so far
    window: int = None         # first id of the window the cache holds; None: nothing read yet

    @property
    def done(self):
        return self.new >= self.max_new_tokens or (self.new > 0 and self.ids[-1] in self.stop_ids)

    def take(self, logits):
        """Sample the next id from this row's logits with its own settings; append and return it."""
        self.ids.append(sample(logits, self.temperature, self.top_k, self.top_p, self.repetition_penalty,
                               self.ids[-REPETITION_WINDOW:], self.generator))
        self.new += 1
        return self.ids[-1]


@torch.inference_mode()
def step_logits(model, cache, rows):
    """The logits of every row's next id, one 1-D tensor per row, in the rows' order.

    A row whose window must be read (its first step, or a re-read when the text outgrows the
    window: see window_start) gets a prompt pass of its own; every other row needs only its last
    id, and those rows share one batched single-position step.
    """
    logits, stepping = {}, []
    for row in rows:
        start = window_start(len(row.ids), model.config.seq_length)
        if start == row.window:
            stepping.append(row)
            continue
        row.window, cache.lengths[row.slot] = start, 0
        out, _ = model(torch.tensor([row.ids[start:]], device=cache.k[0].device), cache=cache, slots=[row.slot])
        logits[id(row)] = out[0, -1]
    if stepping:
        stepping.sort(key=lambda row: row.slot)  # neighbouring slots read the cache without a copy
        last = torch.tensor([[row.ids[-1]] for row in stepping], device=cache.k[0].device)
        out, _ = model(last, cache=cache, slots=[row.slot for row in stepping])
        logits.update((id(row), out[b, -1]) for b, row in enumerate(stepping))
    return [logits[id(row)] for row in rows]


def advance(model, cache, rows):
    """One generation step for every row: sample one new id for each, append it, and return them."""
    return [row.take(logits) for row, logits in zip(rows, step_logits(model, cache, rows))]


def new_cache(model, slots=1):
    """An empty KVCache for `model`, on its device and in its dtype."""
    weight = model.tok_emb.weight
    return KVCache(model.config, slots, device=weight.device, dtype=weight.dtype)


@torch.inference_mode()
def generate(model, prompt_ids, max_new_tokens, temperature=0.8, top_k=None, top_p=None,
             repetition_penalty=1.0, generator=None, stop_ids=(END,), use_cache=True):
    """Yield new ids one at a time, stopping after a stop id or max_new_tokens.

    The prompt (or its most recent window, see window_start) goes through in one forward pass;
    each later id costs one cached step: one Row through advance(). use_cache=False re-runs the
    whole window every step: the slow textbook version, kept for tests and benchmarks.
    """
    model.eval()
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt id")
    row = Row(list(prompt_ids), max_new_tokens, 0, temperature, top_k, top_p, repetition_penalty, generator,
              tuple(stop_ids))
    cache = new_cache(model)
    while not row.done:
        if not use_cache:
            row.window = None  # forget the cache: the whole window is read again
        yield advance(model, cache, [row])[0]


class BeamSearch:
    """Beam search over the KV cache: keep the `num_beams` likeliest continuations, not one sample.

    Each step extends every live beam by every id and keeps the best 2 x num_beams by total log
    probability: a candidate ending in a stop id (within the best num_beams) becomes a finished
    reply, the rest refill the beams. A finished reply of n new ids scores log p / n**length_penalty;
    above 0 that favours longer replies, 0 compares raw probabilities. The search ends when
    num_beams replies are finished and no live beam scores better than the worst of them yet, or
    when the beams reach max_new_tokens.

    The prompt is read once, in the first slot: a new beam starts from its parent's keys and
    values, copied from the parent's slot rather than recomputed. `rows` (the live beams) and
    `update` let a server run the beams in the same batched step as other clients' rows
    (serve.py); `run` does it alone.
    """

    def __init__(self, prompt_ids, max_new_tokens, slots, length_penalty=1.0, stop_ids=(END,)):
        if not prompt_ids:
            raise ValueError("beam search needs at least one prompt id")
        self.slots, self.length_penalty, self.stop_ids = list(slots), length_penalty, tuple(stop_ids)
        self.rows = [Row(list(prompt_ids), max_new_tokens, self.slots[0], stop_ids=self.stop_ids)]
        self.scores = [0.0]    # total log probability of each live beam's new ids
        self.finished = []     # (normalised score, new ids), best first, at most num_beams
        self.prompt_length = len(prompt_ids)

    @property
    def num_beams(self):
        return len(self.slots)

    def normalised(self, score, length):
        return score / max(1, length) ** self.length_penalty

    @property
    def done(self):
        if not self.rows:
            return True
        best_live = self.normalised(max(self.scores), self.rows[0].new)
        return len(self.finished) == self.num_beams and best_live <= self.finished[-1][0]

    def finish(self, ids, score):
        new_ids = ids[self.prompt_length:]
        self.finished.append((self.normalised(score, len(new_ids)), new_ids))
        self.finished = sorted(self.finished, key=lambda f: -f[0])[:self.num_beams]

    @torch.inference_mode()
    def update(self, cache, logits):
        """Take the step's logits (one per live beam, in self.rows' order) and choose the new beams."""
        logprobs = torch.stack(logits).float().log_softmax(-1) + torch.tensor(self.scores, device=logits[0].device)[:, None]
        vocab = logprobs.shape[1]
        top = logprobs.flatten().topk(min(2 * self.num_beams, logprobs.numel()))
        rows, scores, parents = [], [], []
        for rank, (score, flat) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            parent, token = divmod(flat, vocab)
            ids = self.rows[parent].ids + [token]
            if token in self.stop_ids:
                if rank < self.num_beams:
                    self.finish(ids, score)
                continue
            old = self.rows[parent]
            rows.append(dataclasses.replace(old, ids=ids, new=old.new + 1, slot=self.slots[len(rows)]))
            scores.append(score)
            parents.append(old.slot)
            if len(rows) == self.num_beams:
                break
        self.copy_slots(cache, parents, [row.slot for row in rows])
        self.rows, self.scores = rows, scores
        if rows and rows[0].new >= rows[0].max_new_tokens:  # out of length: each beam is a reply as it stands
            for row, score in zip(rows, scores):
                self.finish(row.ids, score)
            self.rows, self.scores = [], []

    @staticmethod
    def copy_slots(cache, sources, targets):
        """Each target slot takes a copy of its source slot's keys and values (and length)."""
        if sources == targets or not targets:
            return
        end = max(cache.lengths[s] for s in sources)
        src, dst = torch.tensor(sources, device=cache.k[0].device), torch.tensor(targets, device=cache.k[0].device)
        for keys in cache.k + cache.v:
            keys[dst, :, :end] = keys[src, :, :end]  # the right side is gathered first: overlaps are safe
        lengths = [cache.lengths[s] for s in sources]
        for slot, length in zip(targets, lengths):
            cache.lengths[slot] = length

    def run(self, model, cache):
        while not self.done:
            self.update(cache, step_logits(model, cache, self.rows))
        return self.finished


def beam_search(model, prompt_ids, max_new_tokens, num_beams=4, length_penalty=1.0, stop_ids=(END,)):
    """The new ids of the best reply beam search finds (ending in its stop id, if it reached one)."""
    model.eval()
    search = BeamSearch(prompt_ids, max_new_tokens, range(num_beams), length_penalty, stop_ids)
    return search.run(model, new_cache(model, num_beams))[0][1]


# ----------------------------------------------------------------------------------------------
# 5. The checkpoint contract
# ----------------------------------------------------------------------------------------------
FORMAT = "luminaai"
FORMAT_VERSION = 2  # 2: SwiGLU gate and value weights fused into one matrix (mlp.up)
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
    if checkpoint.get("format_version", 0) < FORMAT_VERSION:
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


# ----------------------------------------------------------------------------------------------
# 7. Devices: one rule for every stage
# ----------------------------------------------------------------------------------------------
def default_checkpoint(path=None):
    """The checkpoint a chat stage opens: the given path, else the fine-tuned model when there is
    one, else Model.pth (whose absence load_checkpoint then explains)."""
    if path:
        return path
    return next((p for p in DEFAULT_CHECKPOINTS if os.path.exists(p)), DEFAULT_CHECKPOINTS[-1])


def pick_device(name, local_rank=0):
    """auto: CUDA, then Apple's MPS, then the CPU. A named device that is not there is an error,
    never a silent fallback. Under torchrun, plain "cuda" means this process's own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind = name.split(":")[0]
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if kind not in available:
        raise ValueError(f"device must be auto, cuda, cuda:N, mps or cpu, got {name!r}")
    if not available[kind]:
        raise ValueError(f"device {name!r} is not available on this machine; use --device=auto or cpu")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


def unknown_chars_dropped(text, vocab):
    """(text without the characters the model never saw, those characters in order of appearance).
    Chat stages drop them and say so, rather than feeding the model <|unk|>."""
    unknown = vocab.unknown_chars(text)
    return "".join(c for c in text if c not in unknown), unknown
