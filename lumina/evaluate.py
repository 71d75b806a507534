"""Evaluation: val loss and bits/char, the end-of-turn rate on held-out prompts, probe replies."""
import torch

from lumina import engine
from lumina.device import autocast
from lumina.corpus import windows
from lumina.vocab import END, TURN_ENDS, render_chat

PROBES = ["Hello! How are you today?", "What is the capital of France?", "Give me a tip for learning Python."]
END_PROBE_CHARS = 2000  # a reply still open after this many characters has not ended its turn
END_REPLIES = 32        # replies the end-of-turn rate samples at least: six were too few to choose a model on


@torch.no_grad()
def evaluate(net, ids, mask, config, runtime):
    """Mean loss over fixed, evenly spaced val windows: the same windows every time."""
    net.eval()
    seq_length = min(config.seq_length, len(ids) - 1)
    starts = torch.linspace(0, len(ids) - seq_length - 1, config.eval_windows).long().unique()
    total, count = 0.0, 0
    for batch in starts.split(config.batch_size):
        x, y, before = (t.to(runtime.device) for t in windows(ids, mask, batch, seq_length))
        with runtime.autocast():
            _, loss = net(x, y, before=before)
        n = int((y != -1).sum())
        if n:
            total, count = total + float(loss) * n, count + n
    net.train()
    return total / max(count, 1)


def end_of_turn_rate(net, prompts, dtype=None, seed=0, max_chars=END_PROBE_CHARS):
    """The share of replies to held-out prompts that close their turn with <|end|> within
    max_chars, sampled as ChatAI samples by default (temperature 0.8, top-k 40) with fixed seeds:
    each prompt replied to as often as it takes to reach END_REPLIES replies. A chatbot that never
    ends its turn reads well in val loss and badly in a chat; this says which. All the replies run
    as one batch through the engine: seconds, even when none ends."""
    prompts = [p for p in prompts for _ in range(replies_per_prompt(prompts))]
    rows = [engine.Row(list(p), max_chars, slot, temperature=0.8, top_k=40, seed=seed + slot, stop_ids=TURN_ENDS)
            for slot, p in enumerate(prompts)]
    run(engine.Engine(net, len(rows), dtype), rows)
    net.train()
    return sum(row.ids[-1] == END for row in rows) / len(rows)


def replies_per_prompt(prompts):
    return -(-END_REPLIES // max(1, len(prompts)))  # ceil: at least END_REPLIES replies in all


def turn_ends(rate, prompts):
    return f"ends its turn in {rate:.0%} of {len(prompts) * replies_per_prompt(prompts)} held-out replies"


def probe_replies(net, vocab, max_chars, dtype=None, seed=0):
    """(prompt, reply, mean log-probability per character of the reply) for fixed prompts, through
    the chat template: a learner sees the replies grow into words and the model grow surer of them."""
    prompts = [render_chat([{"role": "user", "content": prompt}], vocab, add_generation_prompt=True)[0]
               for prompt in PROBES]
    rows = [engine.Row(list(ids), max_chars, slot, temperature=0.8, top_k=40, seed=seed)  # a copy: the row grows
            for slot, ids in enumerate(prompts)]
    run(engine.Engine(net, len(rows), dtype), rows)
    found = [(prompt, vocab.decode(i for i in row.ids[len(ids):] if i != END), reply_logprob(net, row.ids, len(ids), dtype))
             for prompt, ids, row in zip(PROBES, prompts, rows)]
    net.train()
    return found


@torch.inference_mode()
def attention_view(net, ids, target):
    """What the model read and weighed when it wrote ids[target]: one forward of the window it read
    then (engine.window_start, the rule generation follows), each layer's attention weights made
    explicit for this pass only. Returns (first id of the window, the log-probs (vocab,) it gave
    ids[target], weights (layers, nhead, target - first)): how much the query at ids[target - 1],
    the last one read, looked at each of ids[first:target] in each head; each head's weights sum to 1."""
    if not 0 < target < len(ids):
        raise ValueError(f"target must be between 1 and {len(ids) - 1}, got {target}")
    first = engine.window_start(target, net.config.seq_length)
    device = net.tok_emb.weight.device
    x = torch.tensor([ids[first:target]], device=device)
    before = torch.tensor([engine.predecessors(ids, first)], device=device)
    attention = []
    logits, _ = net(x, before=before, attention=attention)
    return first, logits[0, -1].float().log_softmax(-1), torch.stack([layer[0] for layer in attention])


@torch.no_grad()
def reply_logprob(net, ids, start, dtype=None):
    """The mean log-probability the model gave ids[start:], read in one forward of the window that
    ends with them (a reply longer than the window is scored on its last part)."""
    first = max(0, len(ids) - net.config.seq_length)
    device = net.tok_emb.weight.device
    x = torch.tensor([ids[first:]], device=device)
    before = torch.tensor([engine.predecessors(ids, first)], device=device)
    with autocast(device, dtype or torch.float32):
        logits, _ = net(x, before=before)
    logprobs = logits[0, :-1].float().log_softmax(-1).gather(1, x[0, 1:, None])[:, 0]
    return float(logprobs[max(0, start - first - 1):].mean()) if len(ids) > start else 0.0


def run(eng, rows):
    """Step the rows until every one is done."""
    while live := [row for row in rows if not row.done]:
        eng.step(live)
