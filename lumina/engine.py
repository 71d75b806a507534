"""The engine: everything that generates text from a model. The KV cache, sampling, the window
rule, rows (sequences in flight) and their batched step, plain generation and beam search.
"""
import dataclasses
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from lumina.vocab import END


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
