"""lumina/engine.py: the KV cache, batched sampling with counter-based noise, the window rule,
the Engine's step (two forward passes and one host transfer at most), generate and beam search."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lumina import engine
from lumina.device import seeded_generator
from lumina.engine import BeamSearch, Engine, Row, Sampling, beam_search, choose, generate, gumbel, window_start
from lumina.model import ModelConfig
from lumina.vocab import BOT, END, SPECIAL_TOKENS, SYSTEM, USER
from conftest import DEVICE, tiny_model


def model_on_device(vocab, **shape):
    return tiny_model(vocab, **shape).to(DEVICE).eval()


def random_ids(low, high, n, seed):
    return torch.randint(low, high, (n,), generator=seeded_generator(seed)).tolist()


# --- generation ---------------------------------------------------------------------------------
def _generation_logits(net, prompt, steps, use_cache, monkeypatch):
    seen = []
    real_choose = engine.choose

    def recording_choose(logits, *args, **kwargs):
        seen.append(logits[0].clone())
        return real_choose(logits, *args, **kwargs)

    monkeypatch.setattr(engine, "choose", recording_choose)
    ids = list(generate(net, prompt, steps, temperature=0, stop_ids=(), use_cache=use_cache))
    monkeypatch.setattr(engine, "choose", real_choose)
    return ids, seen


LEVERS = {"qk_norm": True, "logit_softcap": 3.0}  # lumina.model's optional levers, both on


@pytest.mark.parametrize("prompt_len,steps,ngram,levers", [(5, 8, 0, {}), (40, 45, 0, {}), (40, 45, 64, {}),
                                                           (40, 45, 0, LEVERS)])  # inside, then far past, the window
def test_cached_and_uncached_generation_agree(vocab, monkeypatch, prompt_len, steps, ngram, levers):
    net = model_on_device(vocab, ngram_buckets=ngram, **levers)
    if ngram:  # trained n-grams: the cached step and the re-reads must see each id's true predecessors
        torch.nn.init.normal_(net.ngram.pair.weight, std=0.5)
        torch.nn.init.normal_(net.ngram.triple.weight, std=0.5)
    prompt = random_ids(0, len(vocab), prompt_len, 1)
    ids_c, logits_c = _generation_logits(net, prompt, steps, True, monkeypatch)
    ids_u, logits_u = _generation_logits(net, prompt, steps, False, monkeypatch)
    assert ids_c == ids_u and len(ids_c) == steps and len(logits_c) == steps
    for c, u in zip(logits_c, logits_u):
        assert torch.allclose(c, u, atol=1e-5), (c - u).abs().max()


def test_window_rule_keeps_the_most_recent_text():
    T = 16
    for length in range(1, 200):
        start = window_start(length, T)
        assert 0 < length - start <= T  # never empty, never past the window
        if length > T:
            assert length - start >= T * 3 // 4  # a re-read keeps the most recent 3/4 window


def test_generate_streams_and_stops_at_end(vocab):
    net = tiny_model(vocab)
    with torch.no_grad():
        # Final hidden state is always v (norm weight 0, bias v); make <|end|>'s row point along v.
        net.norm.weight.zero_()
        net.norm.bias.copy_(torch.randn(net.config.hidden_size))
        net.head.weight[END] = 10 * net.norm.bias
    stream = generate(net.to(DEVICE), [USER, BOT], 20, temperature=0)
    assert next(stream) == END
    assert list(stream) == []


def test_generate_refuses_an_empty_prompt(vocab):
    with pytest.raises(ValueError, match="at least one prompt id"):
        list(generate(tiny_model(vocab), [], 5))


# --- sampling: one batched draw -------------------------------------------------------------------
LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, 2.5, -1.0])


def draw(logits, seed=0, position=0, recent=None, **settings):
    """One row's draw through the batched choose()."""
    row = Row([0], 1, seed=seed, **{"temperature": 1.0, **settings})
    sampling = Sampling.of([row], logits.shape[-1], logits.device)
    return int(choose(logits[None], sampling, engine.row_keys(sampling.keys, [position], logits.device), recent))


def test_temperature_zero_is_argmax():
    assert draw(LOGITS, temperature=0) == 1


def test_top_k_never_picks_outside_the_k_most_likely():
    assert {draw(LOGITS, seed, temperature=2.0, top_k=3) for seed in range(300)} == {1, 4, 2}


def test_top_p_keeps_the_smallest_set_reaching_p():
    logprobs = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert {draw(logprobs, seed, top_p=0.8) for seed in range(300)} == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert {draw(logprobs, seed, top_p=0.81) for seed in range(300)} == {0, 1, 2}


def test_repetition_penalty_lowers_recent_ids():
    recent = torch.tensor([[1, 1]])
    assert draw(LOGITS, temperature=0, repetition_penalty=2.0, recent=recent) == 4
    assert draw(LOGITS, temperature=0, repetition_penalty=1.0, recent=recent) == 1


def test_choose_does_not_modify_its_input():
    logits = LOGITS.clone()
    draw(logits, temperature=0.5, top_k=2, top_p=0.5, repetition_penalty=1.5, recent=torch.tensor([[1, 2]]))
    assert torch.equal(logits, LOGITS)


def one_row(logits, noise, temperature, top_k, top_p, penalty, recent):
    """The definition of one row's draw, written out plainly, with the given Gumbel noise."""
    logits = logits.clone()
    for i in set(recent):
        logits[i] = logits[i] / penalty if logits[i] > 0 else logits[i] * penalty
    if temperature == 0:
        return int(logits.argmax())
    keep = torch.ones_like(logits, dtype=torch.bool)
    if top_k is not None and top_k < len(logits):  # exactly the k likeliest; of equal logits, the lower ids
        order = sorted(range(len(logits)), key=lambda i: (-logits[i].item(), i))
        keep = torch.zeros_like(keep).index_fill_(0, torch.tensor(order[:top_k]), True)
    if top_p is not None and top_p < 1:
        probs = (logits / temperature).masked_fill(~keep, -math.inf).softmax(-1)
        for i in range(len(logits)):  # i stays if the ids strictly likelier hold less than top_p, or none is likelier
            keep[i] &= bool(probs[probs > probs[i]].sum() < top_p) or bool(probs[i] == probs.max())
    return int(((logits / temperature) + noise).masked_fill(~keep, -math.inf).argmax())


def test_each_setting_of_the_batched_draw_matches_its_one_row_definition_on_fixed_noise():
    B, V = 64, 50
    logits = torch.randn(B, V, generator=seeded_generator(0)) * 3
    logits[:, 7] = logits[:, 9]  # a tie, which top-k and top-p must keep or drop together
    noise = -torch.log(-torch.log(torch.rand(B, V, generator=seeded_generator(1))))
    logits[:, 20] = logits[:, 21] = logits.max(-1).values - 0.05  # near the top: ties at the k-th place
    rows = []
    for b in range(B):
        kind = b % 8
        rows.append(Row([1 + b % 5] * (1 + b % 70), 1, seed=b,
                        temperature=0.0 if kind == 0 else 0.3 + 0.1 * (b % 10),
                        top_k=[None, 1, 3, 10, None, 5, None, V][kind],
                        top_p=[None, None, None, None, 0.5, 0.9, 0.95, 0.0][kind],
                        repetition_penalty=1.0 if b % 3 else 1.5))
    recent = engine.recent_ids(rows, "cpu")
    sampling = Sampling.of(rows, V, logits.device)
    fixed = lambda ids: noise.gather(1, ids) if ids.dim() == 2 else noise[:, ids]
    got = choose(logits, sampling, None, recent, noise=fixed).tolist()
    expected = [one_row(logits[b], noise[b], row.temperature, row.top_k, row.top_p, row.repetition_penalty,
                        row.ids[-engine.REPETITION_WINDOW:]) for b, row in enumerate(rows)]
    assert got == expected
    assert len(set(got)) > 10  # the settings really chose different things


def test_the_noise_is_a_fair_draw_and_depends_on_seed_position_and_id_alone():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    counts = torch.bincount(torch.tensor([draw(logits, seed) for seed in range(4000)]), minlength=5).float()
    expected = logits.softmax(-1) * 4000
    assert ((counts - expected) ** 2 / expected).sum() < 20  # chi-square, 4 degrees of freedom: p < 0.001 above 18.5
    seeds, positions = [engine.seed_key(s) for s in (0, 1, 2 ** 63 - 1, -5)], [0, 5, 9, 1]
    keys, ids = engine.row_keys(seeds, positions, "cpu"), torch.arange(30)
    noise = gumbel(keys, ids)
    assert torch.equal(noise[1:2], gumbel(engine.row_keys(seeds[1:2], positions[1:2], "cpu"), ids))  # alone or beside others
    assert torch.equal(noise[:, 10:20], gumbel(keys, ids[None, 10:20].expand(4, 10)))  # any candidate set
    assert not torch.equal(noise[0], gumbel(engine.row_keys(seeds[:1], [1], "cpu"), ids)[0])  # the next position: new noise
    on_device = gumbel(engine.row_keys(seeds, positions, DEVICE), ids.to(DEVICE)).cpu()
    assert torch.allclose(on_device, noise, atol=1e-5)  # the same draw on any device (log may round differently)
    assert len({round(x, 6) for x in noise.flatten().tolist()}) == noise.numel()


def test_seeds_repeat_and_unseeded_rows_draw_fresh_noise(vocab):
    net = model_on_device(vocab)
    sample = lambda seed: list(generate(net, [USER, 7, 8, BOT], 30, temperature=1.0, top_p=0.95, seed=seed, stop_ids=()))
    assert sample(42) == sample(42) and sample(42) != sample(43)
    assert sample(None) != sample(None)


# --- the engine's step ---------------------------------------------------------------------------------
def run_together(net, rows, join_every, slots, dtype=None, compile=False):
    """Rows join one by one, every `join_every` steps, and leave when done; returns each row's new ids."""
    eng, running, step = Engine(net, slots, dtype, compile), [], 0
    while step < join_every * len(rows) or any(not row.done for row in running):
        if step % join_every == 0 and step // join_every < len(rows):
            running.append(rows[step // join_every])
        eng.step([row for row in running if not row.done])
        step += 1
    return [row.ids[len(row.ids) - row.new:] for row in rows]


def test_a_batched_step_gives_each_row_exactly_what_it_gets_alone(vocab):
    """Rows of different lengths, joining at different times and re-reading their windows at
    different steps, each get the ids generate() gives them alone."""
    net = model_on_device(vocab)  # random weights: greedy would repeat one id, so every row samples
    prompts = [random_ids(len(SPECIAL_TOKENS), len(vocab), n, n) for n in (3, 9, 15, 30)]
    settings = [dict(temperature=1.0), dict(temperature=1.0, top_k=5), dict(temperature=0.7, top_p=0.9),
                dict(temperature=1.2, repetition_penalty=1.3)]
    solo = [list(generate(net, p, 40, stop_ids=(), seed=i, **s)) for i, (p, s) in enumerate(zip(prompts, settings))]
    rows = [Row(list(p), 40, slot=slot, seed=i, stop_ids=(), **s)
            for i, (p, s, slot) in enumerate(zip(prompts, settings, (5, 0, 3, 1)))]
    assert run_together(net, rows, 7, 6) == solo
    assert len({tuple(ids) for ids in solo}) == len(solo) and all(len(set(ids)) > 3 for ids in solo)


def test_seeded_replies_are_the_same_alone_and_in_a_batch_of_64_with_joins_and_leaves(vocab):
    net = model_on_device(vocab, seq_length=24)
    settings = [dict(temperature=0.8, top_k=40), dict(temperature=1.0), dict(temperature=0.9, top_p=0.9),
                dict(temperature=0), dict(temperature=1.1, top_k=5, repetition_penalty=1.2)]
    rows = [Row(random_ids(len(SPECIAL_TOKENS), len(vocab), 1 + i % 30, i), 5 + (7 * i) % 40, slot=63 - i, seed=1000 + i,
                stop_ids=(vocab.stoi["z"],), **settings[i % len(settings)]) for i in range(64)]
    solo = [list(generate(net, row.ids, row.max_new_tokens, row.temperature, row.top_k, row.top_p,
                          row.repetition_penalty, row.seed, row.stop_ids)) for row in rows]
    assert run_together(net, rows, 1, 64) == solo
    assert sum(ids[-1:] == [vocab.stoi["z"]] for ids in solo) > 3  # some rows left early, at their stop id


class Transfers(TorchDispatchMode):
    """Counts what makes the host wait for the device: reading a scalar, data-dependent shapes, and
    (patched in by count_transfers) tolist, numpy and cpu."""
    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNCING:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def count_transfers(monkeypatch, work):
    mode = Transfers()
    for name in ("tolist", "numpy", "cpu"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k:
                            mode.seen.append(_name) or _real(self, *a, **k))
    with mode:
        work()
    monkeypatch.undo()
    return mode.seen


@pytest.mark.parametrize("rows", [1, 8, 64])
def test_a_decode_step_moves_one_tensor_to_the_host(vocab, monkeypatch, rows):
    net = model_on_device(vocab, seq_length=32)
    eng = Engine(net, rows)
    running = [Row(random_ids(len(SPECIAL_TOKENS), len(vocab), 3 + i % 5, i), 100, slot=i, seed=i,
                   repetition_penalty=1.2 if i % 2 else 1.0, top_p=0.9 if i % 3 else None, top_k=None if i % 4 else 20)
               for i in range(rows)]
    eng.step(running)  # every row reads its prompt
    eng.step(running)
    assert count_transfers(monkeypatch, lambda: eng.step(running)) == ["tolist"]
    late = Row([USER, 7, BOT], 10, slot=0, seed=1)  # a join (a prompt read) in the same step as decodes
    assert count_transfers(monkeypatch, lambda: eng.step(running[1:] + [late])) == ["tolist"]


def test_the_cache_takes_the_dtype_of_the_forward_it_serves(vocab):
    net = model_on_device(vocab)
    for dtype in (torch.bfloat16, torch.float32):
        eng = Engine(net, 2, dtype)
        rows = [Row([USER, 7, 8, BOT], 5, slot=s, seed=s) for s in range(2)]
        eng.step(rows)
        eng.step(rows)  # two rows write at once: a mismatched dtype failed here
        assert eng.cache.k[0].dtype == dtype


# --- beam search ----------------------------------------------------------------------------------
class Bigram(torch.nn.Module):
    """A stand-in model whose next-id probabilities depend on the last id alone, read from a table,
    so the best reply can be worked out by hand."""

    def __init__(self, table, vocab_size, seq_length=32):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, hidden_size=2, num_layers=1, nhead=1, seq_length=seq_length)
        self.tok_emb = torch.nn.Embedding(vocab_size, 2)  # a parameter: where the engine finds the device
        self.logits = torch.full((vocab_size, vocab_size), -30.0)  # "never", without -inf arithmetic
        for (after, token), p in table.items():
            self.logits[after, token] = float(torch.tensor(p).log())

    def forward(self, idx, cache=None, before=None):
        return self.logits[idx], None


def test_beam_search_finds_the_likelier_reply_that_greedy_misses():
    A, B, C = 5, 6, 7
    # Greedy takes A (0.6), then C (0.55), then <|end|>: 0.6 * 0.55 = 0.33.
    # B then <|end|> is likelier, 0.4 * 0.9 = 0.36, but B looked worse at the first step.
    net = Bigram({(BOT, A): 0.6, (BOT, B): 0.4, (A, C): 0.55, (A, END): 0.45, (B, END): 0.9,
                  (B, C): 0.1, (C, END): 1.0}, vocab_size=8)
    prompt = [USER, A, BOT]
    assert list(generate(net, prompt, 10, temperature=0)) == [A, C, END]
    assert beam_search(net, prompt, 10, num_beams=2, length_penalty=0) == [B, END]
    # A length penalty of 1 scores log p per character: A C <|end|> (-0.37) now beats B <|end|> (-0.51).
    assert beam_search(net, prompt, 10, num_beams=2, length_penalty=1) == [A, C, END]


def test_one_beam_is_greedy_and_beams_read_the_prompt_once(vocab):
    """On a real model, across a window re-read: num_beams=1 gives greedy's ids exactly; more beams
    find a reply at least as likely; the prompt goes through the model once however many beams."""
    net = model_on_device(vocab, seq_length=16)
    prompt = [USER, 7, 8, 9, BOT]
    greedy = list(generate(net, prompt, 30, temperature=0, stop_ids=()))
    assert beam_search(net, prompt, 30, num_beams=1, stop_ids=()) == greedy

    def log_prob(new):  # uncached, one window: the prompt stays inside it for 11 ids
        out, _ = net(torch.tensor([prompt + new], device=DEVICE))
        return out[0].log_softmax(-1)[torch.arange(len(prompt) - 1, len(prompt) + len(new) - 1), new].sum().item()
    best = beam_search(net, prompt, 11, num_beams=4, length_penalty=0, stop_ids=())
    assert log_prob(best) >= log_prob(list(generate(net, prompt, 11, temperature=0, stop_ids=()))) - 1e-5
    long_reads = []
    forward = net.forward
    net.forward = lambda idx, **kw: (long_reads.append(idx.shape) if idx.shape[1] > 1 else None) or forward(idx, **kw)
    beam_search(net, prompt, 8, num_beams=4, stop_ids=())
    assert long_reads == [torch.Size([1, len(prompt)])]


def test_a_beam_reply_never_crosses_a_turn():
    A, B = 5, 6
    net = Bigram({(BOT, A): 0.5, (BOT, B): 0.5, (A, USER): 0.7, (A, B): 0.3, (B, A): 0.6, (B, END): 0.4},
                 vocab_size=8)
    stops = (END, USER, BOT, SYSTEM)
    for beams in (1, 2, 4):
        reply = beam_search(net, [BOT], 20, num_beams=beams, stop_ids=stops)
        assert reply[-1] in stops and not set(reply[:-1]) & set(stops)


def test_beams_step_beside_sampled_rows_in_one_transfer(vocab, monkeypatch):
    net = model_on_device(vocab)
    prompt = [USER, 7, 8, BOT]
    alone = beam_search(net, prompt, 12, num_beams=3, stop_ids=())
    eng = Engine(net, 5)
    search, row = BeamSearch(prompt, 12, [0, 1, 2], stop_ids=()), Row([USER, 9, BOT], 12, slot=4, seed=3, stop_ids=())
    eng.step([row], [search])
    assert count_transfers(monkeypatch, lambda: eng.step([row], [search])) == ["tolist"]
    while not search.done:
        eng.step([row] if not row.done else [], [search])
    assert search.finished[0][1] == alone
    assert row.ids[3:] == list(generate(net, [USER, 9, BOT], 12, seed=3, stop_ids=()))[:row.new]


def test_a_tie_at_the_kth_place_is_broken_the_same_way_in_any_batch():
    logits = torch.tensor([3.0, 2.0, 2.0, 2.0, 0.0])  # ids 1, 2 and 3 tie for the second place
    alone = [draw(logits, seed, top_k=2) for seed in range(200)]
    assert set(alone) == {0, 1}  # exactly two ids: of equal logits, the lower id

    def beside_a_row_without_top_k(seed):
        rows = [Row([0], 1, seed=seed, temperature=1.0, top_k=2), Row([0], 1, seed=seed, temperature=1.0)]
        sampling = Sampling.of(rows, 5, "cpu")
        return int(choose(torch.stack([logits, logits]), sampling, engine.row_keys(sampling.keys, [0, 0], "cpu"))[0])
    assert [beside_a_row_without_top_k(seed) for seed in range(200)] == alone
    assert draw(logits, 3, top_p=0.0) == 0  # a nucleus of no mass still keeps the likeliest id


@pytest.mark.parametrize("k", [1, 3, 40, 99])
def test_top_ids_are_the_k_likeliest_by_logit_then_lower_id(k):
    """top_ids takes a cheaper road than the topk of ranking_keys (the definition): it must give the
    same ids in the same order, also when many logits tie, as bf16 logits do."""
    logits = (torch.randn(64, 100, generator=seeded_generator(0)) * 2).round()  # about 15 distinct values a row
    logits[:8] = 0.0  # every id tied
    expected = engine.ranking_keys(logits).topk(k).indices
    assert torch.equal(engine.top_ids(logits, k), expected)


COMPILED_PROMPTS = [(3, dict(temperature=1.0)), (9, dict(temperature=0.8, top_k=5)), (30, dict(temperature=0))]


def replies_alone(net, rows_n, dtype, compile):
    """The first rows_n prompts of COMPILED_PROMPTS, each generated alone (30 ids, seeded)."""
    return [list(generate(net, random_ids(len(SPECIAL_TOKENS), net.config.vocab_size, n, n), 30, stop_ids=(), seed=i,
                          dtype=dtype, compile=compile, **s)) for i, (n, s) in enumerate(COMPILED_PROMPTS[:rows_n])]


def replies_compiled_together(net, rows_n, dtype, monkeypatch, compile=True):
    """The same rows joining a compiled batch every 5 steps, in slots out of order, and leaving when
    done: (their ids, the buckets of the compiled passes)."""
    buckets, plan_fixed = [], Engine.plan_fixed
    monkeypatch.setattr(Engine, "plan_fixed", lambda self, rows: buckets.append(engine.bucket(len(rows))) or
                        plan_fixed(self, rows))
    rows = [Row(random_ids(len(SPECIAL_TOKENS), net.config.vocab_size, n, n), 30, slot=(i + rows_n - 1) % rows_n, seed=i,
                stop_ids=(), **s) for i, (n, s) in enumerate(COMPILED_PROMPTS[:rows_n])]
    return run_together(net, rows, 5, rows_n, dtype, compile=compile), set(buckets)


def test_the_compiled_bucketed_decode_gives_the_eager_ids_alone_and_in_a_batch(vocab, monkeypatch):
    """The compiled decode step (rows padded to a power of two, the whole window read under a mask)
    gives the ids of the eager step for the same seeds, through window re-reads; and rows joining
    and leaving a compiled batch (buckets 1, 2 and 4) each get the reply they get alone."""
    net = model_on_device(vocab)
    eager = replies_alone(net, 3, None, compile=False)
    assert replies_alone(net, 3, None, compile=True) == eager
    together, buckets = replies_compiled_together(net, 3, None, monkeypatch)
    assert together == eager and len({tuple(ids) for ids in eager}) == 3 and buckets == {1, 2, 4}  # the compiled step ran


def test_the_compiled_decode_under_bf16_autocast_gives_the_eager_ids_with_two_rows_in_flight(vocab, monkeypatch):
    """The same under bf16 autocast, with two rows in flight, where a KV cache of the wrong dtype
    used to fail. Two rows compile two graphs (buckets 1 and 2), three compile four, at seconds each;
    the buckets' padding is the float32 test's."""
    net = model_on_device(vocab)
    eager = replies_alone(net, 2, torch.bfloat16, compile=False)
    together, buckets = replies_compiled_together(net, 2, torch.bfloat16, monkeypatch)
    assert together == eager and eager[0] != eager[1] and buckets == {1, 2}


def test_passes_of_more_rows_than_the_engine_compiles_run_eager_with_the_same_ids(vocab, monkeypatch):
    """compile=2: passes of one or two rows run compiled, the pass of three eager, in one Engine;
    every row still gets its reply alone. bucket_times, the trial's timer, runs a real bucket."""
    net = model_on_device(vocab)
    together, buckets = replies_compiled_together(net, 3, None, monkeypatch, compile=2)
    assert together == replies_alone(net, 3, None, compile=False) and buckets == {1, 2}
    eager, compiled, compiling = engine.bucket_times(Engine(net, 3, compile=True), 1)
    assert eager > 0 and compiled > 0 and compiling >= 0


def fake_bucket_times(monkeypatch, times):
    """bucket_times from a table {rows: (eager, compiled, compiling seconds)}; returns the rows asked."""
    asked = []
    monkeypatch.setattr(engine, "bucket_times", lambda eng, rows_n: asked.append(rows_n) or times[rows_n])
    return asked


def test_auto_compiles_the_buckets_where_compiled_steps_were_faster_and_caches_it(vocab, monkeypatch):
    net = model_on_device(vocab)
    asked = fake_bucket_times(monkeypatch, {1: (2e-3, 5e-4, 20.0), 2: (1e-3, 4e-4, 15.0), 4: (5e-4, 3e-4, 15.0),
                                            6: (3e-4, 1e-4, 15.0), 8: (2e-4, 1.9e-4, 15.0),
                                            16: (1e-4, 5e-5, 15.0)})
    rows, why = engine.compile_choice(net, "auto", 16)
    assert rows == 4 and asked == [1, 2, 4, 8]  # 8 rows: compiled not 10% faster, so no more buckets are timed
    assert why == "a character (rows 1/2/4/8) took 2/1/0.5/0.2 ms eager, 0.5/0.4/0.3/0.19 ms compiled; compiling took 50 s"
    assert engine.compile_line(rows, 16, "auto", why) == f"compile on for passes of up to 4 of 16 rows (asked auto: {why})"
    assert engine.compile_choice(net, "auto", 16) == (4, why + " (cached)") and len(asked) == 4
    assert engine.compile_choice(net, "true", 16) == (16, "") and engine.compile_choice(net, "false", 16) == (0, "")
    engine.compile_choice(net, "auto", 6)  # other slots: timed again, the last bucket with all 6 rows
    engine.compile_choice(net.to(torch.bfloat16), "auto", 6)  # another precision: timed again
    assert asked[4:] == [1, 2, 4, 6, 1, 2, 4, 6]


def test_a_chat_compiles_only_when_the_characters_it_expects_pay_for_the_compiling(vocab, monkeypatch):
    net = model_on_device(vocab)
    monkeypatch.setattr(engine, "step_seconds", lambda net, rows_n: 2e-3)
    asked = fake_bucket_times(monkeypatch, {1: (2e-3, 5e-4, 20.0)})
    rows, why = engine.compile_choice(net, "auto", 1, expected_chars=4000)
    assert rows == 0 and asked == [] and why.startswith("4,000 characters take 8.0 s eager")  # not worth a trial
    rows, why = engine.compile_choice(net, "auto", 1, expected_chars=10_000)
    assert rows == 0 and asked == [1] and why.endswith("10,000 characters would save only 15 s")
    assert engine.compile_line(rows, 1, "auto", why).startswith("compile off (asked auto: ")
    assert engine.compile_choice(net, "auto", 1, expected_chars=20_000)[0] == 1 and asked == [1]  # saves 30 s
    assert engine.compile_line(1, 1, "true") == "compile on (asked true)"


@pytest.fixture
def two_threads():
    """torch on two threads for one test (the suite runs on one), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_auto_threads_keep_steps_on_one_thread_up_to_the_rows_where_two_were_faster_and_caches_it(vocab, monkeypatch,
                                                                                                  two_threads):
    net = model_on_device(vocab)
    times = {1: (1e-3, 1e-3), 2: (6e-4, 5e-4), 4: (4e-4, 3.7e-4), 6: (3e-4, 2e-4), 8: (2e-4, 1e-4)}  # (1 thread, 2)
    asked = []
    monkeypatch.setattr(engine, "thread_times", lambda net, rows_n, threads: asked.append((rows_n, threads)) or times[rows_n])
    rows, why = engine.thread_choice(net, 0, 16)
    assert rows == 4 and asked == [(1, 2), (2, 2), (4, 2), (8, 2)]  # 2 rows: 17% faster, not enough; 8: 2x, no more timed
    assert why == "a character (rows 1/2/4/8) took 1/0.6/0.4/0.2 ms on 1 thread, 1/0.5/0.37/0.1 ms on 2"
    assert engine.thread_line(rows, 16, 2, 0, why) == f"threads 1 for steps of up to 4 of 16 rows, 2 above (asked auto: {why})"
    assert engine.thread_choice(net, 0, 16) == (4, why + " (cached)") and len(asked) == 4
    assert engine.thread_choice(net, 2, 16) == (0, "") and engine.thread_line(0, 16, 2, 2) == "threads 2 (asked 2)"
    engine.thread_choice(net, 0, 6)  # other slots: timed again, the last bucket with all 6 rows
    assert asked[4:] == [(1, 2), (2, 2), (4, 2), (6, 2)]
    torch.set_num_threads(1)
    assert engine.thread_choice(net, 0, 16) == (0, "torch has one thread here: nothing to choose")


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_an_engine_steps_its_small_batches_on_one_thread_and_the_rest_on_every_thread(vocab, monkeypatch, two_threads,
                                                                                     dtype):
    """one_thread_rows=2: steps of one or two rows run on one thread, of three on both; the ids are
    the same as an Engine's that leaves the threads alone, in float32 and under bf16 autocast."""
    net, seen, real_choose = model_on_device(vocab), [], engine.choose
    monkeypatch.setattr(engine, "choose", lambda *args, **kw: seen.append(torch.get_num_threads()) or real_choose(*args, **kw))
    replies = []
    for one_thread_rows in (2, 0):
        torch.set_num_threads(2)  # an Engine's steps leave this thread on the threads of its last step
        rows = [Row(random_ids(len(SPECIAL_TOKENS), net.config.vocab_size, 5 + i, i), 8, slot=i, seed=i, stop_ids=())
                for i in range(3)]
        eng, seen[:] = Engine(net, 3, dtype, one_thread_rows=one_thread_rows), []
        for n in (1, 2, 3, 3, 2, 1):  # rows joining, then leaving
            eng.step([row for row in rows[:n] if not row.done])
        replies.append([row.ids for row in rows])
        assert seen == ([1, 1, 2, 2, 1, 1] if one_thread_rows else [2] * 6)
    assert replies[0] == replies[1]
    torch.set_num_threads(2)
    one, every = engine.thread_times(net, 2, 2)  # the real timer: both counts timed, torch left on two
    assert one > 0 and every > 0 and torch.get_num_threads() == 2


def test_buckets_are_powers_of_two():
    assert [engine.bucket(n) for n in (1, 2, 3, 4, 5, 17, 64, 65)] == [1, 2, 4, 4, 8, 32, 64, 128]


# --- log-probs --------------------------------------------------------------------------------------
def uncached_logprobs(net, ids, start):
    """log-softmax (new, vocab) of one uncached forward over the whole text, at the positions that
    chose ids[start:] (the text must fit the window)."""
    with torch.no_grad():
        out, _ = net(torch.tensor([ids], device=DEVICE))
    return out[0, start - 1:len(ids) - 1].float().log_softmax(-1)


def check_entries(net, ids, start, entries, k, greedy=False):
    expected = uncached_logprobs(net, ids, start)
    assert len(entries) == len(ids) - start
    for t, entry in enumerate(entries):
        assert math.isclose(entry.logprob, expected[t, ids[start + t]].item(), abs_tol=1e-4)
        assert len(entry.top) == k
        top_lps = [lp for _, lp in entry.top]
        assert top_lps == sorted(top_lps, reverse=True)
        for i, lp in entry.top:
            assert math.isclose(lp, expected[t, i].item(), abs_tol=1e-4)
        if k:  # the alternatives are the k likeliest of the whole distribution
            assert math.isclose(top_lps[0], expected[t].max().item(), abs_tol=1e-5)
        if greedy and k:
            assert entry.top[0][0] == ids[start + t]


def test_logprobs_are_the_models_own_distribution_from_the_batched_step(vocab, monkeypatch):
    """Rows asking for log-probs (with 0, 3 or 5 alternatives) step beside rows that do not, with
    top-k, a repetition penalty and temperature reshaping their draws: each entry is still the
    log-softmax of an uncached forward, the step still makes one transfer, and rows without are untouched."""
    net = model_on_device(vocab, seq_length=48)
    prompts = [[USER] + random_ids(len(SPECIAL_TOKENS), len(vocab), 4 + i, i) + [BOT] for i in range(5)]
    asks = [5, None, 0, 3, None]
    rows = [Row(list(p), 20, slot=i, seed=i, top_k=8, repetition_penalty=1.3, temperature=1.4, stop_ids=(),
                top_logprobs=k) for i, (p, k) in enumerate(zip(prompts, asks))]
    eng = Engine(net, 5)
    eng.step(rows)
    assert count_transfers(monkeypatch, lambda: eng.step(rows)) == ["tolist"]
    while not all(row.done for row in rows):
        eng.step([row for row in rows if not row.done])
    for row, prompt, k in zip(rows, prompts, asks):
        if k is None:
            assert row.entries is None
        else:
            check_entries(net, row.ids, len(prompt), row.entries, k)
    alone = list(generate(net, prompts[0], 20, seed=0, top_k=8, repetition_penalty=1.3, temperature=1.4, stop_ids=()))
    assert rows[0].ids[len(prompts[0]):] == alone  # asking for log-probs never changes the draw


@pytest.mark.parametrize("levers", [{}, LEVERS])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_greedy_logprobs_put_the_chosen_character_first(vocab, dtype, levers):
    net = model_on_device(vocab, seq_length=48, **levers)
    prompt = [USER, 7, 8, 9, BOT]
    pairs = list(generate(net, prompt, 25, temperature=0, stop_ids=(), top_logprobs=4, dtype=dtype))
    ids = [i for i, _ in pairs]
    assert ids == list(generate(net, prompt, 25, temperature=0, stop_ids=(), dtype=dtype))
    for i, entry in pairs:
        assert entry.top[0][0] == i and len(entry.top) == 4
    if dtype is None:
        check_entries(net, prompt + ids, len(prompt), [e for _, e in pairs], 4, greedy=True)


def test_more_alternatives_than_the_vocabulary_gives_them_all(vocab):
    net = model_on_device(vocab)
    ((_, entry),) = generate(net, [USER, 7, BOT], 1, temperature=0, top_logprobs=10 ** 3)
    assert sorted(i for i, _ in entry.top) == list(range(len(vocab)))
    assert math.isclose(sum(math.exp(lp) for _, lp in entry.top), 1.0, abs_tol=1e-4)


def test_beam_search_entries_follow_each_beam_through_its_branches(vocab):
    net = model_on_device(vocab, seq_length=48)
    prompt = [USER, 7, 8, 9, BOT]
    plain = beam_search(net, prompt, 14, num_beams=3, stop_ids=())
    ids, entries = beam_search(net, prompt, 14, num_beams=3, stop_ids=(), top_logprobs=2)
    assert ids == plain
    check_entries(net, prompt + ids, len(prompt), entries, 2)
    search = BeamSearch(prompt, 14, [0, 1, 2], stop_ids=(), top_logprobs=0)
    for _, reply, found in search.run(Engine(net, 3)):  # every finished beam, not only the best
        check_entries(net, prompt + reply, len(prompt), found, 0)
