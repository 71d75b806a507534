"""Preference tuning with DPO (Rafailov et al. 2023): learn from pairs of replies to one prompt,
the better one chosen by people (OASST1 ranks sibling replies), without a reward model.

The loss raises the policy's log-probability of the chosen reply relative to a frozen reference
(the starting model), against the same for the rejected reply:

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

A reply's log-probability is the sum over all its characters (and its <|end|>), each scored with
the context the engine gives it when it generates: the window rule's, so a reply longer than the
window counts whole. The reference's log-probabilities are computed once, at the start.
"""
import dataclasses

import torch
import torch.nn.functional as F

from lumina import data
from lumina.engine import predecessors, window_start
from lumina.vocab import END, Vocab, encode_documents, render_chat, turns_to_drop

PAD = END  # what fills a window after its last id: no scored position can see it


@dataclasses.dataclass
class PairData:
    """Preference pairs as the windows that score them, and what the Trainer's evaluation reads."""
    train: list                # per pair: (inputs (W, T), targets (W, T), which (W,): 0 chosen, 1 rejected,
                               #   before (W, 2): the ids preceding each window)
    val_pairs: list            # the same, held out
    val: torch.Tensor          # ids of the held-out prompts with their chosen replies: val bits/char
    val_mask: torch.Tensor
    vocab: Vocab
    new_chars: dict
    problems: list
    val_prompts: list          # the held-out prompts, rendered for a reply: the end-of-turn rate
    trimmed: int               # prompts whose oldest turns were dropped to fit the window


def reply_windows(prompt_ids, reply_ids, seq_length):
    """(inputs, targets, before): windows (W, seq_length) that score every id of the reply once,
    each in the window the engine reads when it generates that id (window_start), and the two ids
    preceding each window (W, 2). Targets are -1 where nothing is scored. Row w holds
    ids[start:start + seq_length] and predicts the next id at each position."""
    ids = prompt_ids + reply_ids
    text = torch.tensor(ids, dtype=torch.int32)
    scored = torch.arange(len(prompt_ids), len(ids))  # ids[i] is predicted from ids[window_start(i):i]
    starts = torch.tensor([window_start(i, seq_length) for i in scored.tolist()], dtype=torch.long)
    # One row per window. Starts never decrease along the text, so sorted is their order of appearance.
    firsts, row = torch.unique(starts, sorted=True, return_inverse=True)
    columns = firsts[:, None] + torch.arange(seq_length)  # (W, seq_length): where each window's ids sit in ids
    inputs = torch.where(columns < len(ids), text[columns.clamp(max=len(ids) - 1)], PAD)
    targets = torch.full(columns.shape, -1, dtype=torch.int32)
    targets[row, scored - 1 - starts] = text[scored]  # one write: id by id, the sample's 283 pairs took 15 s
    before = torch.tensor([predecessors(ids, start) for start in firsts.tolist()], dtype=torch.int32).view(-1, 2)
    return inputs, targets, before


def encode_pair(pair, vocab, seq_length):
    """((inputs, targets, which), trimmed) for one pair. A prompt that would leave less than a
    quarter of the window for the reply loses its oldest turns, whole, as chat history does."""
    dropped = turns_to_drop(pair["prompt"], seq_length)
    prompt, _ = render_chat(pair["prompt"][dropped:], vocab, add_generation_prompt=True)
    sides = [reply_windows(prompt, vocab.encode(pair[key]) + [END], seq_length) for key in ("chosen", "rejected")]
    which = torch.cat([torch.full((len(x),), side, dtype=torch.int64) for side, (x, _, _) in enumerate(sides)])
    inputs, targets, before = (torch.cat(parts) for parts in zip(*sides))
    return (inputs, targets, which, before), dropped > 0


def load_pairs(path, val_fraction, seed, base_vocab, seq_length, assistant_only=True):
    """PairData from a pairs file or Dataset_download.py's folder, in base_vocab extended by the
    pairs' new characters (their rows are added to the model as for supervised fine-tuning)."""
    problems = []
    train, val = data.training_pairs(path, val_fraction, seed, problems)
    texts = [text for pair in train + val for text in [pair["chosen"], pair["rejected"]] +
             [m["content"] for m in pair["prompt"]]]
    counts = data.document_chars([("text", text) for text in texts])
    vocab = base_vocab.extended(sorted(counts))
    encoded = {split: [encode_pair(pair, vocab, seq_length) for pair in pairs] for split, pairs in
               (("train", train), ("val", val or train))}
    held = [("chat", pair["prompt"] + [{"role": "assistant", "content": pair["chosen"]}]) for pair in val or train]
    ids, mask = encode_documents(held, vocab, assistant_only)
    prompts = {tuple(render_chat(pair["prompt"], vocab, add_generation_prompt=True)[0]): None for pair in val}
    return PairData([p for p, _ in encoded["train"]], [p for p, _ in encoded["val"]], torch.from_numpy(ids),
                    torch.from_numpy(mask), vocab, {c: counts[c] for c in vocab.chars[len(base_vocab.chars):]},
                    problems, [list(p) for p in prompts], sum(t for _, t in encoded["train"] + encoded["val"]))


def batch_of(pairs):
    """Stack some pairs' windows: (inputs, targets, sequence, before) where sequence numbers each
    window's reply: 2k for pair k's chosen, 2k + 1 for its rejected."""
    inputs, targets, _, before = (torch.cat(parts).long() for parts in zip(*pairs))
    sequence = torch.cat([2 * k + which for k, (_, _, which, _) in enumerate(pairs)])
    return inputs, targets, sequence, before


def sequence_logprobs(model, pairs, device):
    """(pairs, 2) log-probabilities of each pair's chosen and rejected reply under `model`."""
    inputs, targets, sequence, before = (t.to(device) for t in batch_of(pairs))
    logits, _ = model(inputs, before=before)
    logp = -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
    per_window = logp.view(targets.shape).sum(1)  # ignored targets add 0
    return torch.zeros(2 * len(pairs), device=device).index_add_(0, sequence, per_window).view(-1, 2)


def reply_chars(pairs):
    """(pairs, 2) how many ids of each pair's chosen and rejected reply are scored (its <|end|> too)."""
    return torch.tensor([[float((t[w == side] >= 0).sum()) for side in (0, 1)] for _, t, w, _ in pairs])


def unscored_end(pairs):
    """The same windows with each reply's closing <|end|> left unscored (a prompt is never scored,
    so every <|end|> target is a reply's)."""
    return [(x, t.masked_fill(t == END, -1), w, b) for x, t, w, b in pairs]


def dpo_loss(policy, reference, beta):
    """The mean DPO loss of (pairs, 2) log-probabilities [chosen, rejected]: log 2 at the reference."""
    ratios = policy - reference
    return -F.logsigmoid(beta * (ratios[:, 0] - ratios[:, 1])).mean()


@torch.no_grad()
def logprobs_of(net, pairs, runtime, batch=16):
    """(pairs, 2) log-probabilities of every pair, in eval mode, a few pairs at a time."""
    net.eval()
    with runtime.autocast():
        out = [sequence_logprobs(net, pairs[i:i + batch], runtime.device).float() for i in range(0, len(pairs), batch)]
    net.train()
    return torch.cat(out)


def pair_metrics(policy, reference, beta):
    """What a user reads at each evaluation: the share of pairs whose implicit reward
    beta * (log pi - log ref) prefers the chosen reply, the mean reward margin, and the mean change
    of the chosen replies' log-probability (in nats; how far the model moved from the reference)."""
    rewards = beta * (policy - reference)
    margin = rewards[:, 0] - rewards[:, 1]
    wins = (margin > 0).float() + 0.5 * (margin == 0).float()  # a tie counts half: the reference itself scores 0.5
    return {"pair_accuracy": wins.mean().item(), "reward_margin": margin.mean().item(),
            "chosen_logp_change": (policy - reference)[:, 0].mean().item()}


class DPO:
    """The Trainer's objective for preference pairs: a step's batch is `n` pairs drawn at random;
    the reference log-probabilities come from the starting model, once, and travel with the
    resumable state. The model file keeps the last evaluation: beta and the budget hold the model
    near its reference, and the held-out pairs are too few to choose a step on."""
    keeps_last = True
    metrics_names = ("pair_accuracy", "reward_margin", "chosen_logp_change")

    def __init__(self, found, beta, per_char=False, score_end=True):
        self.beta, self.reference = beta, None
        self.pairs = {split: getattr(found, split) if score_end else unscored_end(getattr(found, split))
                      for split in ("train", "val_pairs")}
        self.chars = {split: reply_chars(pairs).clamp(min=1.0)  # an empty reply: log-prob 0 either way
                      for split, pairs in self.pairs.items()} if per_char else None

    def compared(self, logp, split, index=slice(None)):
        """Log-probabilities as the rewards compare them: summed over the reply, or with per_char
        per character, so that a reply's length alone moves no reward (see fine_tune.py)."""
        return logp / self.chars[split][index].to(logp.device) if self.chars else logp

    def prepare(self, net, runtime, saved=None):
        """The reference log-probabilities: from a resumed run's state, else from `net` as it starts."""
        self.reference = saved or {split: logprobs_of(net, pairs, runtime) for split, pairs in self.pairs.items()}

    def state(self):
        return self.reference

    def draw(self, n, sampler, progress=1.0):
        return torch.randint(len(self.pairs["train"]), (n,), generator=sampler)

    def split(self, batch, micro_batch):
        return [(chunk, len(chunk) / len(batch)) for chunk in batch.split(micro_batch)]

    def loss(self, model, chunk, runtime):
        policy = sequence_logprobs(model, [self.pairs["train"][i] for i in chunk.tolist()], runtime.device).float()
        reference = self.reference["train"][chunk].to(runtime.device)
        return dpo_loss(self.compared(policy, "train", chunk), self.compared(reference, "train", chunk), self.beta)

    def tokens(self, batch):
        return sum(self.pairs["train"][i][0].numel() for i in batch.tolist())

    def metrics(self, net, runtime):
        policy = logprobs_of(net, self.pairs["val_pairs"], runtime)
        reference = self.reference["val_pairs"].to(runtime.device)
        return pair_metrics(self.compared(policy, "val_pairs"), self.compared(reference, "val_pairs"), self.beta)
