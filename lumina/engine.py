"""The engine: everything that generates text from a model.

  1. the KV cache, and the view of it that one forward pass reads and writes;
  2. sampling: every row's next id in one batched draw, with its own settings as tensors and
     counter-based noise, so a seeded row gets the same reply alone, in a batch of 64, on any device;
  3. the window rule: what a row reads once its text outgrows the context;
  4. rows and the Engine, whose step advances every row in flight with at most two forward passes
     and one transfer to the host;
  5. generate() (one streamed reply) and beam search.

ChatAI.py, serve.py, the probes and the end-of-turn rate all generate through the Engine.
"""
import collections
import contextlib
import copy
import dataclasses
import functools
import secrets
import time
import types

import torch
import torch.nn as nn

from lumina.device import CPU_CANDIDATES, DTYPES, autocast, remembered, timed_dtype, trial_key
from lumina.vocab import END


# ----------------------------------------------------------------------------------------------
# 1. The KV cache
# ----------------------------------------------------------------------------------------------
class KVCache:
    """Keys and values of every layer for `slots` sequences, one slot each, up to the window.

    k[layer] has shape (slots, nhead, seq_length, head_dim). The buffers are made at the first
    write, in the dtype of the keys written, which is the dtype of the forward pass the cache
    serves (bf16 under bf16 autocast): no caller can hand it the wrong one. lengths[slot] counts
    the positions a slot holds, as plain ints, so bookkeeping never waits for the device.
    """

    def __init__(self, config, slots, device):
        self.config, self.slots, self.device = config, slots, torch.device(device)
        self.k = self.v = None
        self.lengths = [0] * slots

    def buffers(self, like):
        """(keys, values) lists, made on first use in like's dtype; converted if a pass changes it."""
        if self.k is None:
            c = self.config
            shape = (self.slots, c.nhead, c.seq_length, c.hidden_size // c.nhead)
            self.k, self.v = ([torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(c.num_layers)]
                              for _ in range(2))
        elif self.k[0].dtype != like.dtype:
            self.k, self.v = [t.to(like.dtype) for t in self.k], [t.to(like.dtype) for t in self.v]
        return self.k, self.v

    def view(self, slots, starts, T):
        """Where one forward pass of T new positions per row reads and writes: see CacheView."""
        return CacheView(self, slots, starts, T)

    def lengths_update(self, lengths):
        """After a pass: {slot: positions it now holds}."""
        for slot, length in lengths.items():
            self.lengths[slot] = length

    def copy_slots(self, sources, targets):
        """Each target slot takes a copy of its source slot's keys, values and length (beam search)."""
        if sources == targets or not targets:
            return
        end = max(self.lengths[s] for s in sources)
        src, dst = torch.tensor(sources, device=self.device), torch.tensor(targets, device=self.device)
        for keys in (self.k or []) + (self.v or []):  # none yet when nothing was written (a stand-in model)
            keys[dst, :, :end] = keys[src, :, :end]  # the right side is gathered first: overlaps are safe
        lengths = [self.lengths[s] for s in sources]
        for slot, length in zip(targets, lengths):
            self.lengths[slot] = length


class CacheView:
    """One forward pass's place in a KVCache: row b writes its T new keys at positions starts[b]...
    and its query t (at starts[b] + t) sees the keys up to there. Rows that all start at the same
    position (one sequence, or prompts read together from 0) need no index tensors; a single new
    position of one such row needs no mask. Rows in neighbouring slots read through a view, others
    are gathered."""

    def __init__(self, cache, slots, starts, T):
        device, self.cache, self.T = cache.device, cache, T
        self.start, self.end = starts[0], max(starts) + T
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        self.rows = slice(slots[0], slots[0] + len(slots)) if contiguous else torch.tensor(slots, device=device)
        if all(s == self.start for s in starts):
            self.positions = None
            self.mask = None if T == 1 else torch.ones(T, self.end, dtype=torch.bool, device=device).tril(self.start)
        else:
            self.slot_index = torch.tensor(slots, device=device)[:, None]
            self.positions = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)  # (B, T)
            self.mask = (torch.arange(self.end, device=device) <= self.positions[:, :, None])[:, None]  # (B, 1, T, end)

    def attend(self, layer, k, v):
        """Store k and v (B, nhead, T, head_dim); return every key and value the rows may see, and the mask."""
        keys, values = self.cache.buffers(k)
        K, V = keys[layer], values[layer]
        if self.positions is None:
            K[self.rows, :, self.start:self.start + self.T] = k
            V[self.rows, :, self.start:self.start + self.T] = v
        else:
            K[self.slot_index, :, self.positions] = k.transpose(1, 2)  # indexed as (B, T, nhead, head_dim)
            V[self.slot_index, :, self.positions] = v.transpose(1, 2)
        return K[self.rows, :, :self.end], V[self.rows, :, :self.end], self.mask


class FixedView:
    """A decode pass (one new id per row) in shapes that depend on the number of rows alone, for a
    compiled step: row b writes its key at positions[b] of slot slots[b] and reads the whole window
    under a mask, and rows are gathered by index, so one graph serves any slots and lengths.
    Reading the whole window costs more than CacheView's slice at many rows (see benchmarks)."""

    def __init__(self, keys, values, slots, positions, seq_length):
        self.keys, self.values, self.slots = keys, values, slots
        self.start, self.end = 0, seq_length
        self.positions = positions[:, None]  # (B, 1)
        self.mask = (torch.arange(seq_length, device=slots.device) <= self.positions[:, :, None])[:, None]  # (B, 1, 1, S)

    def attend(self, layer, k, v):
        K, V = self.keys[layer], self.values[layer]
        K[self.slots[:, None], :, self.positions] = k.transpose(1, 2)  # indexed as (B, 1, nhead, head_dim)
        V[self.slots[:, None], :, self.positions] = v.transpose(1, 2)
        return K[self.slots], V[self.slots], self.mask


def fixed_decode(model, keys, values, x, before, slots, positions):
    """The logits (B, vocab) of one decode pass through a FixedView: what compiled_decode compiles."""
    view = FixedView(keys, values, slots, positions, model.config.seq_length)
    logits, _ = model(x, cache=view, before=before)
    return logits[:, -1]


GRAPH_LIMIT = 64  # compiled decode graphs kept per process


@functools.cache
def compiled_decode(device_type):
    """fixed_decode under torch.compile with static shapes: one graph per bucket of rows (and per
    model and cache dtype), kept across Engines, so each reply of a chat reuses it. On a CPU the C++
    wrapper cuts the per-call overhead that dominates a step this small; on CUDA, reduce-overhead
    replays each bucket's graph as a CUDA graph (not measured here: no GPU was lent)."""
    # One graph per bucket, model, precision and cache size: more than torch's default limit of 8
    # graphs per function, past which it silently runs the function uncompiled.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, GRAPH_LIMIT)
    if device_type == "cuda":
        return torch.compile(fixed_decode, dynamic=False, mode="reduce-overhead")
    return torch.compile(fixed_decode, dynamic=False, options={"cpp_wrapper": True} if device_type == "cpu" else {})


def bucket(rows_n):
    """Rows a compiled decode pass is padded to: a power of two, so a few graphs serve every batch
    as rows join and leave (at most 2x the work of the real rows)."""
    return 1 << (rows_n - 1).bit_length()


class PastKV:
    """One sequence's keys and values passed in and handed back, not written in place: the cache of
    an exported graph (export.py --onnx), where a step is a pure function. It is a view like
    CacheView for the model. past has shape (layers, 2, 1, nhead, P, head_dim) for P positions read
    so far (P may be 0); after a pass of T ids, present() has the same layout with P + T."""

    def __init__(self, past, T):
        self.past, self.presents, self.positions = past, [], None
        self.start = past.shape[-2]
        self.end = self.start + T
        # Always a mask, even for one new id: a branch on T would not survive export.
        self.mask = torch.ones(T, self.end, dtype=torch.bool, device=past.device).tril(diagonal=self.start)

    def attend(self, layer, k, v):
        k, v = torch.cat([self.past[layer, 0], k], dim=2), torch.cat([self.past[layer, 1], v], dim=2)
        self.presents.append(torch.stack([k, v]))
        return k, v, self.mask

    def present(self):
        return torch.stack(self.presents)


class StepGraph(nn.Module):
    """One generation step as a pure function, the form export.py hands to the ONNX exporter:
    (ids (1, T), past (layers, 2, 1, nhead, P, head_dim), before (1, 2): the two ids before ids,
    -1 for none) -> (logits (1, T, vocab), present)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, past, before):
        cache = PastKV(past, ids.shape[1])
        logits, _ = self.model(ids, cache=cache, before=before)
        return logits, cache.present()


# ----------------------------------------------------------------------------------------------
# 2. Sampling: one batched draw for every row
# ----------------------------------------------------------------------------------------------
REPETITION_WINDOW = 64  # at the character level every letter recurs, so penalise recent ids only
MASK32 = 0xFFFFFFFF
POSITION_SALT, ID_SALT = 0x9E3779B9, 0x85EBCA6B  # keep position 0 and id 0 away from mix32's fixed point 0
ID_SPACE = 2 ** 20  # ranking_keys tell ids apart below this vocabulary size


def mix32(x):
    """A 32-bit integer hash (xor-shift and multiply rounds) of a Python int or an int64 tensor of
    values below 2**32. Every multiplier is below 2**31, so no product overflows int64: the same
    integer ops give the same bits on a CPU and on a GPU."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & MASK32
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & MASK32
    x = ((x ^ (x >> 16)) * 0x297A2D39) & MASK32
    return x ^ (x >> 15)


def seed_key(seed):
    """A row's seed (any int, e.g. OpenAI's signed 64-bit one) as a 32-bit hash key."""
    seed %= 2 ** 64
    return mix32((seed & MASK32) ^ mix32(seed >> 32))


def row_keys(seed_keys, positions, device):
    """(B,) int64: each row's noise key for its positions-th draw, from its seed key (both Python
    ints). Hashed on the host: two hashes of one number per row cost less in Python than the dozens
    of tensor operations they take on a device, which dominate a one-row draw (about 60 us of 195
    on a 2-core EPYC), and about the same at 64 rows."""
    return torch.tensor([mix32(key ^ mix32((position + POSITION_SALT) & MASK32))
                         for key, position in zip(seed_keys, positions)], dtype=torch.int64, device=device)


def gumbel(keys, ids):
    """Gumbel(0, 1) noise for drawing id `ids` in the draws whose row keys (row_keys: seed and
    position) are `keys`: keys (B,) int64, ids (B, K) or (K,) -> (B, K) float32. Counter-based:
    each number depends on (seed, position, id) alone, never on what else is drawn beside it, so a
    row's draw is the same alone, in any batch, and on any device. argmax(logits / T + noise) is
    then a sample from softmax(logits / T) (the Gumbel-max trick)."""
    bits = mix32(keys[:, None] ^ ((ids + ID_SALT) & MASK32)) >> 8  # 24 random bits: exact in float32
    uniform = (bits.float() + 0.5) * 2.0 ** -24  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(uniform))


@dataclasses.dataclass
class Sampling:
    """Every row's settings as tensors (B,), and what the batch needs, worked out on the host so
    that choosing a code path never waits for the device."""
    temperature: torch.Tensor  # 0: greedy
    top_k: torch.Tensor        # int64; the vocabulary size keeps every id
    top_p: torch.Tensor        # 1: off
    penalty: torch.Tensor      # 1: off
    keys: list                 # seed keys (seed_key), Python ints: row_keys hashes them on the host
    k_limit: int               # the largest top_k of a row that limits it, 0 if none does
    candidates: int            # ids a draw looks at: k_limit when every sampled row keeps at most that many
    top_p_used: bool
    penalty_used: bool
    sampled: bool              # False: every row is greedy
    greedy_used: bool          # some row is greedy

    @classmethod
    def of(cls, rows, vocab_size, device):
        greedy = [row.temperature == 0 for row in rows]
        top_k = [min(row.top_k or vocab_size, vocab_size) for row in rows]
        top_p = [1.0 if row.top_p is None else row.top_p for row in rows]
        limited = [k for k, g in zip(top_k, greedy) if k < vocab_size and not g]
        keeps_all = any(k == vocab_size for k, g in zip(top_k, greedy) if not g)
        tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device)
        return cls(tensor([row.temperature for row in rows], torch.float32), tensor(top_k, torch.int64),
                   tensor(top_p, torch.float32), tensor([row.repetition_penalty for row in rows], torch.float32),
                   [seed_key(row.seed) for row in rows], max(limited, default=0),
                   vocab_size if keeps_all or not limited else max(limited),
                   any(p < 1 for p, g in zip(top_p, greedy) if not g),
                   any(row.repetition_penalty != 1 for row in rows), not all(greedy), any(greedy))


def recent_ids(rows, device):
    """(B, REPETITION_WINDOW) of each row's latest ids; a short row repeats its first id, which
    changes nothing, as the penalty treats the ids as a set."""
    return torch.tensor([row.ids[:1] * (REPETITION_WINDOW - len(row.ids)) + row.ids[-REPETITION_WINDOW:] for row in rows],
                        device=device)


def penalise(logits, recent, penalty):
    """Make each row's recent ids (B, W) rarer: a positive logit is divided by the penalty, a
    negative one multiplied (dividing would raise it). A penalty of 1 changes nothing."""
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, recent, True)
    p = penalty[:, None]
    return torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)


def keep_top_p(values, keep, top_p):
    """Narrow `keep` (B, K) to each row's nucleus: the most likely ids whose mass reaches top_p.
    Ids of equal probability stay or go together, so the set never depends on their order."""
    probs = values.masked_fill(~keep, -torch.inf).softmax(-1)
    ordered = probs.sort(dim=-1, descending=True).values
    before = ordered.cumsum(-1) - ordered  # the mass of the ids ahead of each, in order
    columns = torch.arange(ordered.shape[-1], device=ordered.device).expand_as(ordered)
    starts = torch.where(ordered != ordered.roll(1, -1), columns, 0)
    starts[:, 0] = 0
    before = before.gather(-1, starts.cummax(-1).values)  # a run of equal ids: the mass ahead of its first
    inside = (before < top_p[:, None]) | (top_p[:, None] >= 1) | (columns == 0)  # top_p 0 keeps the likeliest
    floor = torch.where(inside, ordered, torch.inf).min(-1, keepdim=True).values
    return keep & (probs >= floor)


def ranking_keys(logits, ids=None):
    """(B, V) int64 keys that order each row's ids by logit, then by lower id: an ordering with no
    ties, so "the k likeliest ids" is one set however the draw is batched and on any device
    (bf16 logits tie often). A float's bits, with a negative float's magnitude bits flipped, sort
    as the float does. `ids` (B, K): the keys of those ids, whose logits are given (B, K)."""
    bits = (logits.float() + 0.0).view(torch.int32).long()  # + 0.0 makes -0.0 a plain 0.0: equal logits
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    if ids is None:
        ids = torch.arange(logits.shape[-1], device=logits.device)
    return ordered * ID_SPACE + (ID_SPACE - 1 - ids)


def top_ids(logits, k):
    """Each row's k likeliest ids (B, V) -> (B, k), likeliest first and of equal logits the lower id
    first: what the topk of ranking_keys gives, at about half the cost. torch.topk of the float
    logits finds the values exactly, and every id likelier than the k-th value; only its choice among
    ids equal to the k-th value is unspecified, so those are found again, lowest ids first, from a
    running count of the ties (searchsorted: no host sync). Then the k ids are sorted by their keys."""
    values, ids = logits.topk(k)
    kth = values[:, -1:]
    above = (values > kth).sum(-1, keepdim=True)  # (B, 1): ids likelier than the k-th, all found by topk
    tied_so_far = (logits == kth).cumsum(-1)  # (B, V): how many ids up to each tie with the k-th value
    nth_tie = torch.arange(k, device=logits.device) - above  # (B, k): which tie each column past `above` takes
    ids = torch.where(nth_tie >= 0, torch.searchsorted(tied_so_far, nth_tie.clamp(min=0) + 1), ids)
    order = ranking_keys(logits.gather(1, ids), ids).argsort(-1, descending=True)
    return ids.gather(1, order)


def choose(logits, sampling, noise_keys, recent=None, noise=None):
    """The next id of every row, in one batched draw: logits (B, V) -> ids (B,) on their device.

    Per row: the repetition penalty; then greedy (temperature 0) takes the argmax (the lowest id
    of equal logits); otherwise only the row's top_k likeliest ids stay (of equal logits the lower
    ids), then only its nucleus (the likeliest ids whose mass reaches top_p), and Gumbel-max draws
    one id from softmax(logits / temperature) over them. noise_keys: the rows' keys of this draw's
    noise (row_keys: seed and position). `noise(ids)` gives the Gumbel noise of candidate ids
    (default: gumbel() with the noise keys); tests pass fixed noise."""
    logits = logits.float()
    if sampling.penalty_used:
        logits = penalise(logits, recent, sampling.penalty)
    if not sampling.sampled:
        return logits.argmax(-1)
    vocab = logits.shape[-1]
    temperature = torch.where(sampling.temperature > 0, sampling.temperature, 1.0)[:, None]
    if sampling.candidates < vocab:  # every sampled row keeps at most this many: draw among those only
        ids = top_ids(logits, sampling.candidates)  # (B, K), likeliest first
        values = logits.gather(1, ids) / temperature
        keep = torch.arange(sampling.candidates, device=logits.device) < sampling.top_k[:, None]
    else:
        values, ids = logits / temperature, torch.arange(vocab, device=logits.device)
        keep = torch.ones_like(values, dtype=torch.bool)
        if sampling.k_limit:
            keys = ranking_keys(logits)
            kth = keys.topk(sampling.k_limit).values.gather(1, (sampling.top_k.clamp(max=sampling.k_limit) - 1)[:, None])
            keep = (keys >= kth) | (sampling.top_k[:, None] >= vocab)
    if sampling.top_p_used:
        keep = keep_top_p(values, keep, sampling.top_p)
    noise = noise or (lambda candidate_ids: gumbel(noise_keys, candidate_ids))
    drawn = (values + noise(ids)).masked_fill(~keep, -torch.inf).argmax(-1)
    if ids.dim() == 2:
        drawn = ids.gather(1, drawn[:, None])[:, 0]
    if sampling.greedy_used:  # the argmax of a whole row is not cheap on a CPU: only when a row asks for it
        drawn = torch.where(sampling.temperature > 0, drawn, logits.argmax(-1))
    return drawn


# ----------------------------------------------------------------------------------------------
# 3. The window rule
# ----------------------------------------------------------------------------------------------
def window_start(length, seq_length):
    """First id the model sees when the text is `length` ids long.

    While the text fits, the model sees all of it. When it outgrows the window, the oldest ids are
    dropped so that the most recent 3/4 of a window remain, and the model re-reads them in one
    pass. Re-reading only once per quarter window keeps the cost per new character nearly flat,
    and the rule depends on lengths alone, so cached and uncached generation see exactly the same
    text (export.py's ONNX chat restates it).
    """
    if length <= seq_length:
        return 0
    keep = max(1, seq_length * 3 // 4)
    stride = seq_length + 1 - keep  # ids added between two re-reads
    rereads = 1 + (length - seq_length - 1) // stride
    return rereads * stride


# ----------------------------------------------------------------------------------------------
# 4. Rows and the engine
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    """One sequence being generated: its ids so far, how to sample it, and its KV-cache slot.

    A chat uses one row; a server runs many through one Engine. A row's draws depend on its seed
    and its own ids only, so a seeded reply does not depend on what is generated beside it; a
    row without a seed gets a random one, drawn once: fresh noise."""
    ids: list                  # the prompt, then every id generated so far
    max_new_tokens: int
    slot: int = 0              # which slot of the KV cache holds this row's keys and values
    temperature: float = 0.8   # 0: greedy
    top_k: int = None
    top_p: float = None
    repetition_penalty: float = 1.0
    seed: int = None
    stop_ids: tuple = (END,)
    top_logprobs: int = None   # None: no log-probs; k >= 0: each new id's Entry, with the k likeliest alternatives
    new: int = 0               # ids generated so far
    window: int = None         # first id of the window the cache holds; None: nothing read yet
    entries: list = None       # with top_logprobs: one Entry per new id

    def __post_init__(self):
        if self.seed is None:
            self.seed = secrets.randbits(63)
        if self.top_logprobs is not None and self.entries is None:
            self.entries = []

    @property
    def done(self):
        return self.new >= self.max_new_tokens or (self.new > 0 and self.ids[-1] in self.stop_ids)

    def take(self, new_id, entry=None):
        self.ids.append(new_id)
        self.new += 1
        if entry is not None:
            self.entries.append(entry)


MAX_TOP_LOGPROBS = 20  # alternatives a caller may ask for per id (OpenAI's API allows 20): serve.py's and ChatAI's limit
LOGPROB_FLOOR = -9999.0  # log-probs below it are reported as it: OpenAI's "never" (JSON has no -Infinity)


class Entry(collections.namedtuple("Entry", "logprob top")):
    """What the model thought of one id it wrote: its log-probability, and (id, log-probability)
    of the likeliest ids, likeliest first. Both are the model's own distribution, before the
    repetition penalty, temperature, top-k or top-p reshaped it for the draw (as OpenAI and vLLM
    report them): how sure the model was, not how the dice were loaded. Below LOGPROB_FLOOR, the floor."""


def logprob_numbers(logits, chosen, k):
    """The numbers behind each row's Entry, flat float32 on the device: the chosen ids' log-probs
    (B,), then, when k > 0, the k likeliest ids' log-probs (B * k) and those ids (B * k; exact as
    float32 below 2**24). The likeliest come first, of equal logits the lower id, as greedy takes."""
    logits = logits.float()
    logprobs = logits.log_softmax(-1).clamp(min=LOGPROB_FLOOR)
    numbers = [logprobs.gather(1, chosen[:, None])[:, 0]]
    if k:
        ids = top_ids(logits, k)
        numbers += [logprobs.gather(1, ids).flatten(), ids.flatten().float()]
    return torch.cat(numbers)


def read_entries(numbers, rows_n, k, limits):
    """The Entries of rows_n rows from logprob_numbers' numbers, now Python floats; row b keeps
    limits[b] of the k alternatives. Returns (entries, numbers used)."""
    tops = read_top(numbers[rows_n:], rows_n, k, limits)
    return [Entry(lp, top) for lp, top in zip(numbers[:rows_n], tops)], rows_n * (1 + 2 * k)


def read_top(numbers, rows_n, k, limits):
    """Each row's first limits[b] (id, log-prob) alternatives from the k log-probs and then k ids
    per row that logprob_numbers packs (numbers starting at the log-probs)."""
    # Every row's (id, log-prob) pairs at once (half the time of a loop per row); then each row's
    # share, which is shorter where a row asks for more than the vocabulary.
    pairs = list(zip(map(int, numbers[rows_n * k:2 * rows_n * k]), numbers[:rows_n * k]))
    return [pairs[b * k:b * k + min(limit, k)] for b, limit in enumerate(limits)]


def predecessors(ids, first):
    """The two ids before ids[first] (-1 for none): what the model's n-grams read before a pass."""
    return ([-1, -1] + ids[max(0, first - 2):first])[-2:]


class Engine:
    """A model, a KV cache of `slots` rows, and the step that advances every row in flight.

    A step reads every row whose window must be read (its first step, or a re-read: see
    window_start) in one padded forward pass, moves every other row one position in a second,
    draws every row's next id in one call (choose), and brings one tensor to the host: the chosen
    ids (with the candidates of any beam searches packed in). `dtype` runs the passes under that
    autocast; None keeps the caller's. compile: False, True (every decode pass) or a number of rows:
    decode passes of up to that many rows run compiled_decode, their rows padded to a bucket (the
    padding rows write into one extra scratch slot of the cache), larger ones eager. compile_rows
    may be changed later (compile_choice times both ways in one Engine). one_thread_rows: steps of
    up to that many rows run on one CPU thread, larger ones on the threads torch had when the Engine
    was made (thread_choice); 0 leaves torch's threads alone."""

    def __init__(self, model, slots=1, dtype=None, compile=False, one_thread_rows=0):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.one_thread_rows, self.threads = one_thread_rows, torch.get_num_threads()
        self.compile_rows = slots if compile is True else int(compile)
        self.cache = KVCache(model.config, slots + 1 if self.compile_rows else slots, self.device)
        self.decode, self.scratch = (compiled_decode(self.device.type) if self.compile_rows else None), slots
        self.precision = autocast(self.device, dtype) if dtype is not None else contextlib.nullcontext()
        self.settings = (None, None)  # (the rows' settings, their Sampling): reused while they step

    @torch.inference_mode()
    def logits(self, rows):
        """The logits (B, vocab) of every row's next id, in the rows' order."""
        seq_length = self.model.config.seq_length
        starts = [window_start(len(row.ids), seq_length) for row in rows]
        # Stepping rows in slot order: neighbouring slots read the cache through a view, not a copy.
        stepping = sorted((b for b, row in enumerate(rows) if starts[b] == row.window), key=lambda b: rows[b].slot)
        reading = [b for b, row in enumerate(rows) if starts[b] != row.window]
        # Every tensor a pass needs is made before any pass runs: on a GPU, a copy from the host made
        # after a pass was queued would wait for that pass.
        passes = [self.plan([rows[b] for b in group], firsts, reading) for group, firsts, reading in
                  ((stepping, [len(rows[b].ids) - 1 for b in stepping], False), (reading, [starts[b] for b in reading], True))
                  if group]
        order = stepping + reading
        unsort = None if order == sorted(order) else torch.tensor(sorted(range(len(order)), key=order.__getitem__),
                                                                 device=self.device)
        with self.precision:
            parts = [self.run(one_pass) for one_pass in passes]
        for row, start in zip(rows, starts):
            row.window = start  # only now: a pass that failed left the row to be read again
        logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        return logits if unsort is None else logits[unsort]

    def plan(self, rows, firsts, reading):
        """One pass of every row's ids from ids[first] on, as tensors: a window read from cache
        position 0 (reading), or one id after what the row's slot holds. Texts are right-padded to
        the longest: the padding follows each row's last id, where none of its real positions can
        see it."""
        if self.decode is not None and not reading and len(rows) <= self.compile_rows:
            return self.plan_fixed(rows)
        texts, cache = [row.ids[first:] for row, first in zip(rows, firsts)], self.cache
        T = max(map(len, texts))
        starts = [0 if reading else cache.lengths[row.slot] for row in rows]
        x = torch.tensor([text + text[-1:] * (T - len(text)) for text in texts], device=self.device)
        before = torch.tensor([predecessors(row.ids, first) for row, first in zip(rows, firsts)], device=self.device)
        last = None if T == 1 else (torch.arange(len(texts), device=self.device),
                                    torch.tensor([len(text) - 1 for text in texts], device=self.device))
        lengths = {row.slot: start + len(text) for row, text, start in zip(rows, texts, starts)}
        return types.SimpleNamespace(x=x, before=before, view=cache.view([row.slot for row in rows], starts, T),
                                     last=last, lengths=lengths, fixed=None)

    def plan_fixed(self, rows):
        """A decode pass (each row's last id, after what its slot holds) for compiled_decode, padded
        to bucket(len(rows)) rows that write into the scratch slot at position 0."""
        pad, lengths = bucket(len(rows)) - len(rows), self.cache.lengths
        tensor = lambda values: torch.tensor(values, device=self.device)
        fixed = (tensor([row.ids[-1:] for row in rows] + [[0]] * pad),
                 tensor([predecessors(row.ids, len(row.ids) - 1) for row in rows] + [[-1, -1]] * pad),
                 tensor([row.slot for row in rows] + [self.scratch] * pad),
                 tensor([lengths[row.slot] for row in rows] + [0] * pad))
        return types.SimpleNamespace(fixed=fixed, rows=len(rows), lengths={row.slot: lengths[row.slot] + 1 for row in rows})

    def run(self, one_pass):
        """The logits at each row's last id of a planned pass; the slots now hold the new ids."""
        if one_pass.fixed is not None:  # the slots were read before (a decode follows a read): the buffers exist
            out = self.decode(self.model, self.cache.k, self.cache.v, *one_pass.fixed)[:one_pass.rows]
            self.cache.lengths_update(one_pass.lengths)
            return out
        out, _ = self.model(one_pass.x, cache=one_pass.view, before=one_pass.before)
        self.cache.lengths_update(one_pass.lengths)
        return out[:, -1] if one_pass.last is None else out[one_pass.last]

    def sampling(self, rows):
        """(Sampling, noise keys, recent ids) of the rows, on the device, made before any pass runs."""
        settings = [(row.temperature, row.top_k, row.top_p, row.repetition_penalty, row.seed) for row in rows]
        if settings != self.settings[0]:
            self.settings = (settings, Sampling.of(rows, self.model.config.vocab_size, self.device))
        sampling = self.settings[1]
        keys = row_keys(sampling.keys, [row.new for row in rows], self.device) if sampling.sampled else None
        return sampling, keys, recent_ids(rows, self.device) if sampling.penalty_used else None

    @torch.inference_mode()
    def step(self, rows, searches=()):
        """Advance every row and every beam search one id; returns the rows' new ids."""
        rows, beams = list(rows), [row for search in searches for row in search.rows]
        if not rows and not beams:
            return []
        if self.one_thread_rows:
            use_threads(1 if len(rows) + len(beams) <= self.one_thread_rows else self.threads)
        drawing = self.sampling(rows) if rows else None
        asking = [b for b, row in enumerate(rows) if row.top_logprobs is not None]  # rows that want log-probs
        k = min(max((rows[b].top_logprobs for b in asking), default=0), self.model.config.vocab_size)
        picked = torch.tensor(asking, device=self.device) if asking and asking != list(range(len(rows))) else None
        scores = [search.scores_on(self.device) for search in searches]
        logits = self.logits(rows + beams)
        # Everything the host needs goes in one float32 tensor (ids and beam x vocab + id are exact
        # below 2**24; MPS has no float64): the step's one transfer to the host.
        parts = []
        if rows:
            chosen = choose(logits[:len(rows)], *drawing)
            parts.append(chosen.float())
            if asking:  # from the logits this step made anyway: log-probs cost no second forward
                parts.append(logprob_numbers(*((logits[:len(rows)], chosen) if picked is None else
                                               (logits[picked], chosen[picked])), k))
        offset = len(rows)
        for search, score in zip(searches, scores):
            parts.append(search.propose(logits[offset:offset + len(search.rows)], score))
            offset += len(search.rows)
        numbers = torch.cat(parts).tolist()
        new_ids = [int(n) for n in numbers[:len(rows)]]
        offset = len(rows)
        entries = {}
        if asking:
            found, used = read_entries(numbers[offset:], len(asking), k, [rows[b].top_logprobs for b in asking])
            entries, offset = dict(zip(asking, found)), offset + used
        for b, (row, new_id) in enumerate(zip(rows, new_ids)):
            row.take(new_id, entries.get(b))
        for search in searches:
            search.accept(numbers[offset:offset + search.proposal_size], self.cache)
            offset += search.proposal_size
        return new_ids


def buckets_upto(rows_n):
    """The buckets that passes of 1 to rows_n rows are padded to: 1, 2, 4 ... bucket(rows_n)."""
    return [1 << i for i in range(bucket(rows_n).bit_length())]


def compile_buckets(engine):
    """Run a compiled Engine's decode pass at every bucket it compiles, so that each graph is
    compiled at start-up, not while a client waits. The slots' contents are left for the next rows
    to overwrite: a row's first step reads its prompt from position 0. Torch's threads are left as
    they were, whatever the Engine's steps set."""
    def run():
        for n in buckets_upto(engine.compile_rows) if engine.compile_rows else ():
            rows = [Row([0, 0], 2, slot=i, temperature=0, stop_ids=()) for i in range(min(n, engine.scratch))]
            engine.step(rows)
            engine.step(rows)
    on_threads(engine.threads, run)


TRIAL_PROMPT = 32   # ids each row of a timed trial reads before it steps
TRIAL_STEPS = 5     # timed steps per trial, after two untimed ones (the prompt pass and a warm-up)
TRIAL_TURNS = 50    # timed steps of each of two ways that take turns: one step of one row varies by 1.5x from the
                    # next, and a busy spell of the machine's neighbours can outlast 20 turns (40 ms): with 5 or
                    # 20, a compiled one-row step was timed as slow as eager at some starts, 30% faster at most


def trial_rows(vocab_size, rows_n, prompt=TRIAL_PROMPT):
    """rows_n rows of ChatAI's default sampling (top-k 40), seeded, each with a prompt to read."""
    return [Row([(i + j) % vocab_size for j in range(prompt)], 10 ** 6, slot=i, top_k=40, seed=i) for i in range(rows_n)]


def best_step(engine, rows, steps=TRIAL_STEPS):
    """Seconds per character of the rows stepping together: the best of `steps` steps."""
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        engine.step(rows)
        best = min(best, time.perf_counter() - start)
    return best / len(rows)


def taking_turns(ways, turns=TRIAL_TURNS):
    """{name: the least of `turns` results of ways[name]()}, each a step's seconds per character, the
    ways taking turns: on a shared machine the neighbours come and go, and ways timed one after the
    other can see different machines."""
    best = {name: float("inf") for name in ways}
    for _ in range(turns):
        for name, way in ways.items():
            best[name] = min(best[name], way())
    return best


def ready(net, rows_n, prompt=TRIAL_PROMPT, **engine_options):
    """(engine, rows): rows_n trial rows in an Engine of their own, their prompts read and one step
    taken (a warm-up)."""
    engine, rows = Engine(net, rows_n, **engine_options), trial_rows(net.config.vocab_size, rows_n, prompt)
    engine.step(rows)
    engine.step(rows)
    return engine, rows


def step_seconds(net, rows_n, steps=TRIAL_STEPS):
    """Seconds per character of rows_n rows stepping together with ChatAI's default sampling (top-k
    40), after their prompts are read: the best of `steps` steps."""
    return best_step(*ready(net, rows_n), steps)


def generation_dtype(net, asked, row_counts):
    """(dtype, why) ChatAI.py and serve.py generate in, their weights cast to it once (a chat stage
    never trains, so it keeps no float32 copy): what `asked` names, or for auto the precision whose
    characters cost least at the row counts the stage will run (ChatAI: 1; serve.py: 1 and
    max_batch), timed on a copy of this model (lumina.device.timed_dtype)."""
    device = next(net.parameters()).device
    row_counts = tuple(sorted(set(row_counts)))
    key = trial_key(device, dataclasses.asdict(net.config), {"generate rows": row_counts})

    timed = {}

    def trial(name):  # the first call times every precision, taking turns; the next reads its result
        if not timed:
            timed.update(precision_times(net, row_counts))
        return timed[name]
    return timed_dtype(asked, device, trial, key, f"a character (rows {'/'.join(map(str, row_counts))})")


def precision_times(net, row_counts):
    """{precision: [seconds per character at each row count]} of copies of net cast to each of
    CPU_CANDIDATES, the precisions taking turns at each row count."""
    models = {name: copy.deepcopy(net).to(DTYPES[name]) for name in CPU_CANDIDATES}
    times = {name: [] for name in CPU_CANDIDATES}
    for rows_n in row_counts:
        ways = {name: functools.partial(best_step, *ready(model, rows_n), 1) for name, model in models.items()}
        for name, seconds in taking_turns(ways).items():
            times[name].append(seconds)
    return times


# Compiling the decode step pays where a step is many small operations (one row: about 4x on the
# forward) and not where it is arithmetic: a compiled pass reads the whole window for every row,
# where an eager one reads up to the longest row (64 rows: slower compiled; benchmarks/README.md,
# "Issue 30"). Where the line falls depends on the machine and the model, so it is timed here, once.
COMPILE_GAIN = 0.9    # a bucket runs compiled when its compiled step takes at most this share of the eager one
COMPILE_FLOOR = 10.0  # seconds: less than compiling one graph took here (11.5 s with torch's cache warm, 23-35 s
                      # cold; benchmarks/README.md, "Chat"): work that takes less than this eager never pays it back


def bucket_times(engine, rows_n):
    """(eager, compiled, compiling): seconds per character of rows_n rows of a compiled Engine
    stepping together half a window into their replies, eager and compiled, and how much longer
    than an eager step the first compiled one took (compiling the bucket's graph)."""
    rows = trial_rows(engine.model.config.vocab_size, rows_n, engine.model.config.seq_length // 2)
    engine.compile_rows = 0
    engine.step(rows)  # the prompt pass
    engine.step(rows)  # a warm-up
    eager = best_step(engine, rows)
    start = time.perf_counter()
    engine.compile_rows = bucket(rows_n)
    engine.step(rows)
    compiling = max(time.perf_counter() - start - eager * rows_n, 0.0)
    engine.step(rows)  # a warm-up of the compiled graph

    def way(compile_rows):
        engine.compile_rows = compile_rows
        return best_step(engine, rows, 1)
    times = taking_turns({"eager": functools.partial(way, 0), "compiled": functools.partial(way, bucket(rows_n))})
    return min(eager, times["eager"]), times["compiled"], compiling


def compile_trial(engine):
    """A compile trial's record: each bucket from 1 row up, eager against compiled ("times": {rows:
    [eager, compiled]}), until compiling stops paying or the Engine's slots are covered; "chosen":
    the largest bucket up to which every bucket paid (0: none); "compile_seconds": their compiling."""
    times, chosen, seconds = {}, 0, 0.0
    for n in buckets_upto(engine.scratch):
        eager, compiled, compiling = bucket_times(engine, min(n, engine.scratch))
        times[str(n)] = [eager, compiled]
        if compiled > COMPILE_GAIN * eager:
            break
        chosen, seconds = n, seconds + compiling
    return {"chosen": chosen, "times": times, "compile_seconds": seconds}


def compile_choice(net, asked, slots, expected_chars=None, one_thread_rows=0):
    """(rows, why): decode passes of up to `rows` rows run compiled (0: none) in ChatAI.py (1 slot)
    or serve.py (max_batch slots); the net is already in its generation precision. true compiles
    every pass and false none. auto times eager against compiled steps of this model on this machine
    (compile_trial, cached as the precision is) and compiles the buckets where compiling paid. With
    expected_chars (a chat session), it compiles only if the time saved over that many characters
    pays for the compiling; work that takes less than COMPILE_FLOOR eager is not even timed."""
    if asked != "auto":
        return (slots if asked == "true" else 0), ""
    if expected_chars is not None:
        eager = step_seconds(net, 1)
        if eager * expected_chars < COMPILE_FLOOR:
            return 0, (f"{expected_chars:,} characters take {eager * expected_chars:.1f} s eager, less than "
                       f"compiling takes ({COMPILE_FLOOR:.0f} s or more): not timed")
    weights = next(net.parameters())
    key = trial_key(weights.device, dataclasses.asdict(net.config), {"compile slots": slots, "dtype": str(weights.dtype),
                                                                     "one thread rows": one_thread_rows})
    engine = Engine(net, slots, compile=True, one_thread_rows=one_thread_rows)
    record, cached = remembered(key, lambda: on_threads(engine.threads, compile_trial, engine))
    rows, times = record["chosen"], record["times"]
    why = (times_line(times, "eager", "compiled") + f"; compiling took {record['compile_seconds']:.0f} s" +
           (" (cached)" if cached else ""))
    if rows and expected_chars is not None:
        eager, compiled = times["1"]
        saved = (eager - compiled) * expected_chars
        if saved < record["compile_seconds"]:
            rows, why = 0, why + f"; {expected_chars:,} characters would save only {saved:.0f} s"
    return rows, why


# A step of few rows is about a hundred small operations, each shared out across the threads and
# waited for; in serve.py the HTTP side runs beside them. Timed alone on a 2-core EPYC (Zen 4), one
# thread and two stepped one row equally fast, 16 rows 10% faster on two, 64 rows 30% faster; served
# over HTTP, one client got 984-1,155 characters/s on one thread against 594-607 on two, 16 clients
# 2,346-2,485 against 1,822-2,462, and 64 clients were even (benchmarks/README.md, "Issue 30"). The
# cost that the HTTP side adds is not in a trial of the step alone, so a bucket of rows runs on
# every thread only where the trial finds it clearly faster: by a quarter.
THREADS_GAIN = 0.75  # every thread runs a bucket when its step takes at most this share of one thread's


def use_threads(n):
    if torch.get_num_threads() != n:  # setting it costs well under a microsecond, but why pay twice
        torch.set_num_threads(n)


def on_threads(n, work, *args):
    """work(*args) with torch on n threads, then torch's threads as they were."""
    before = torch.get_num_threads()
    use_threads(n)
    try:
        return work(*args)
    finally:
        use_threads(before)


def thread_times(net, rows_n, threads):
    """(one, every): seconds per character of rows_n rows stepping together on one thread and on
    `threads`, taking turns in one Engine."""
    engine, rows = ready(net, rows_n)
    times = taking_turns({k: functools.partial(on_threads, k, best_step, engine, rows, 1) for k in (1, threads)})
    return times[1], times[threads]


def thread_trial(net, slots, threads):
    """A thread trial's record: each bucket from 1 row up, one thread against `threads` ("times":
    {rows: [one, all]}), until every thread pays or the slots are covered; "chosen": the largest
    bucket up to which one thread was as fast (0: none). More rows only give threads more to share."""
    times, chosen = {}, 0
    for n in buckets_upto(slots):
        rows_n = min(n, slots)
        one, every = thread_times(net, rows_n, threads)
        times[str(n)] = [one, every]
        if every <= THREADS_GAIN * one:
            break
        chosen = rows_n
    return {"chosen": chosen, "times": times}


def thread_choice(net, asked, slots):
    """(rows, why): serve.py's steps of up to `rows` rows run on one thread, larger ones on all of
    torch's threads (0: all on torch's). asked: serve.py's --threads; a number is obeyed as it is
    (no trial), 0 (auto) times one thread against all of them on this model, cached per machine,
    model shape, precision and slots. Only a CPU has threads to choose."""
    weights, threads = next(net.parameters()), torch.get_num_threads()
    if asked or weights.device.type != "cpu":
        return 0, ""
    if threads == 1:
        return 0, "torch has one thread here: nothing to choose"
    key = trial_key(weights.device, dataclasses.asdict(net.config), {"thread slots": slots, "dtype": str(weights.dtype)})
    record, cached = remembered(key, lambda: thread_trial(net, slots, threads))
    why = times_line(record["times"], "on 1 thread", f"on {threads}") + (" (cached)" if cached else "")
    return record["chosen"], why


def thread_line(rows, slots, threads, asked, why=""):
    """The one log line that says how many threads serve.py's steps run on: chosen, asked, and why."""
    chosen = (str(threads) if not rows else "1" if rows >= slots else
              f"1 for steps of up to {rows} of {slots} rows, {threads} above")
    return f"threads {chosen} (asked {asked or 'auto'}" + (f": {why})" if not asked else ")")


def times_line(times, first, second):
    """"a character (rows 1/2) took 0.9/0.5 ms <first>, 0.6/0.4 ms <second>" of a trial's times,
    {rows: [first's seconds, second's]}."""
    return (f"a character (rows {'/'.join(times)}) took " + "/".join(f"{t[0] * 1000:.3g}" for t in times.values()) +
            f" ms {first}, " + "/".join(f"{t[1] * 1000:.3g}" for t in times.values()) + f" ms {second}")


def compile_line(rows, slots, asked, why=""):
    """The one log line that says which decode passes run compiled: chosen, asked, and why."""
    chosen = "off" if not rows else "on" if rows >= slots else f"on for passes of up to {rows} of {slots} rows"
    return f"compile {chosen} (asked {asked}" + (f": {why})" if asked == "auto" else ")")


# ----------------------------------------------------------------------------------------------
# 5. One streamed reply, and beam search
# ----------------------------------------------------------------------------------------------
def generate(model, prompt_ids, max_new_tokens, temperature=0.8, top_k=None, top_p=None,
             repetition_penalty=1.0, seed=None, stop_ids=(END,), use_cache=True, dtype=None, compile=False,
             top_logprobs=None):
    """Yield new ids one at a time, stopping after a stop id or max_new_tokens; with top_logprobs
    (0 or more alternatives), yield (id, its Entry).

    The prompt (or its most recent window, see window_start) goes through in one forward pass;
    each later id costs one cached step of one row. use_cache=False re-reads the whole window every
    step: the slow textbook version, kept for tests and benchmarks.
    """
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt id")
    engine = Engine(model, 1, dtype, compile)
    row = Row(list(prompt_ids), max_new_tokens, 0, temperature, top_k, top_p, repetition_penalty, seed,
              tuple(stop_ids), top_logprobs)
    while not row.done:
        if not use_cache:
            row.window = None  # forget the cache: the whole window is read again
        new_id = engine.step([row])[0]
        yield new_id if top_logprobs is None else (new_id, row.entries[-1])


class BeamSearch:
    """Beam search over the KV cache: keep the `num_beams` likeliest continuations, not one sample.

    Each step extends every live beam by every id and keeps the best 2 x num_beams by total log
    probability: a candidate ending in a stop id (within the best num_beams) becomes a finished
    reply, the rest refill the beams. A finished reply of n new ids scores log p / n**length_penalty;
    above 0 that favours longer replies, 0 compares raw probabilities. The search ends when
    num_beams replies are finished and no live beam scores better than the worst of them yet, or
    when the beams reach max_new_tokens.

    The prompt is read once, in the first slot: a new beam starts from its parent's keys and
    values, copied from the parent's slot rather than recomputed. An Engine steps the beams beside
    any other rows: propose() ranks the candidates on the device, accept() takes them on the host.
    """

    def __init__(self, prompt_ids, max_new_tokens, slots, length_penalty=1.0, stop_ids=(END,), top_logprobs=None):
        if not prompt_ids:
            raise ValueError("beam search needs at least one prompt id")
        self.slots, self.length_penalty, self.stop_ids = list(slots), length_penalty, tuple(stop_ids)
        self.rows = [Row(list(prompt_ids), max_new_tokens, self.slots[0], temperature=0, stop_ids=self.stop_ids,
                         top_logprobs=top_logprobs)]
        self.scores = [0.0]    # total log probability of each live beam's new ids
        self.finished = []     # (normalised score, new ids, their Entries or None), best first, at most num_beams
        self.prompt_length = len(prompt_ids)
        self.top_logprobs = top_logprobs  # None: no Entries; k: each id's Entry with k alternatives
        self.vocab_size = self.proposal_size = self.candidates = self.k = 0

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

    def finish(self, new_ids, score, entries):
        self.finished.append((self.normalised(score, len(new_ids)), new_ids, entries))
        self.finished = sorted(self.finished, key=lambda f: -f[0])[:self.num_beams]

    def scores_on(self, device):
        """The live beams' scores as a tensor, made before the step's passes run (see Engine.logits)."""
        return torch.tensor(self.scores, device=device)

    def propose(self, logits, scores):
        """The best 2 x num_beams (score, beam x vocab + id) of the live beams' logits (beams, vocab)
        and their scores, as one float32 tensor: the scores, then the flat indices (exact below
        2**24); with top_logprobs, then each candidate's own log-prob and every beam's
        alternatives (logprob_numbers' layout)."""
        self.vocab_size = logits.shape[1]
        logprobs = logits.float().log_softmax(-1)
        top = (logprobs + scores[:, None]).flatten().topk(min(2 * self.num_beams, logprobs.numel()))
        parts = [top.values, top.indices.float()]
        self.candidates = len(top.values)
        if self.top_logprobs is not None:
            self.k = min(self.top_logprobs, self.vocab_size)
            reported = logprobs.clamp(min=LOGPROB_FLOOR)
            parts.append(reported.flatten()[top.indices])
            if self.k:
                ids = top_ids(logits.float(), self.k)
                parts += [reported.gather(1, ids).flatten(), ids.flatten().float()]
        self.proposal_size = sum(len(part) for part in parts)
        return torch.cat(parts)

    def candidate_entries(self, numbers):
        """Per candidate, its Entry (or None without top_logprobs), from propose()'s numbers."""
        n = self.candidates
        if self.top_logprobs is None:
            return [None] * n
        beams = len(self.rows)
        tops = read_top(numbers[3 * n:], beams, self.k, [self.k] * beams)
        return [Entry(lp, tops[int(flat) // self.vocab_size]) for lp, flat in zip(numbers[2 * n:3 * n], numbers[n:2 * n])]

    def accept(self, numbers, cache):
        """Choose the new beams from propose()'s numbers, now on the host. A parent's id list (and
        Entries) passes to its last new beam, extended in place; only a parent with several children
        is copied, so a step does not copy every beam's whole history (quadratic over a long reply)."""
        n, kept = self.candidates, []  # kept: (score, parent, token, entry) of the new beams
        for rank, (score, flat, entry) in enumerate(zip(numbers[:n], numbers[n:2 * n], self.candidate_entries(numbers))):
            parent, token = divmod(int(flat), self.vocab_size)
            if token in self.stop_ids:
                if rank < self.num_beams:
                    old = self.rows[parent]
                    self.finish(old.ids[self.prompt_length:] + [token], score,
                                None if entry is None else old.entries + [entry])
                continue
            kept.append((score, parent, token, entry))
            if len(kept) == self.num_beams:
                break
        uses, rows = collections.Counter(parent for _, parent, _, _ in kept), []
        for score, parent, token, entry in kept:
            old = self.rows[parent]
            uses[parent] -= 1
            ids, entries = old.ids, old.entries
            if uses[parent]:  # a parent's last child takes its lists; the others copy them
                ids = list(ids)
                entries = None if entries is None else list(entries)
            ids.append(token)
            if entry is not None:
                entries.append(entry)
            rows.append(dataclasses.replace(old, ids=ids, entries=entries, new=old.new + 1, slot=self.slots[len(rows)]))
        cache.copy_slots([self.rows[parent].slot for _, parent, _, _ in kept], [row.slot for row in rows])
        self.rows, self.scores = rows, [score for score, _, _, _ in kept]
        if rows and rows[0].new >= rows[0].max_new_tokens:  # out of length: each beam is a reply as it stands
            for row, score in zip(rows, self.scores):
                self.finish(row.ids[self.prompt_length:], score, row.entries)
            self.rows, self.scores = [], []

    def run(self, engine):
        while not self.done:
            engine.step([], [self])
        return self.finished


def beam_search(model, prompt_ids, max_new_tokens, num_beams=4, length_penalty=1.0, stop_ids=(END,), dtype=None,
                compile=False, top_logprobs=None):
    """The new ids of the best reply beam search finds (ending in its stop id, if it reached one);
    with top_logprobs, (ids, their Entries)."""
    search = BeamSearch(prompt_ids, max_new_tokens, range(num_beams), length_penalty, stop_ids, top_logprobs)
    _, ids, entries = search.run(Engine(model, num_beams, dtype, compile))[0]
    return ids if top_logprobs is None else (ids, entries)
