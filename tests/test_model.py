"""model.py: vocabulary, chat template, transformer, generation, checkpoints, expansion, config."""
import dataclasses
import os

import pytest
import torch

import Train
from lumina import engine
from lumina.adapt import add_lora, expand_vocab, freeze_all_but_new_rows, load_lora, lora_state
from lumina.checkpoint import (CheckpointError, FORMAT_VERSION, build_model, default_checkpoint, load_checkpoint,
                               model_state, save_checkpoint)
from lumina.device import pick_device
from lumina.engine import KVCache, Row, advance, beam_search, generate, new_cache, sample, window_start
from lumina.model import CharTransformer, ModelConfig
from lumina.optim import make_optimizer
from lumina.vocab import BOT, END, SPECIAL_TOKENS, SYSTEM, UNK, USER, Vocab, parse_chat, render_chat
from conftest import ROOT, tiny_checkpoint, tiny_model


# --- vocabulary and chat template ---------------------------------------------------------------
def test_decode_is_exact_for_newlines_tabs_and_non_ascii(vocab):
    text = "a\tb\nñ c!"
    assert vocab.decode(vocab.encode(text)) == text


def test_unknown_characters_map_to_unk_and_are_named(vocab):
    ids = vocab.encode("aé b€")
    assert ids[1] == UNK and ids[4] == UNK and UNK not in (ids[0], ids[2], ids[3])
    assert vocab.unknown_chars("aé b€é") == ["é", "€"]


def test_chat_template_round_trips(vocab):
    chat = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi\nthere"},
            {"role": "assistant", "content": "hello"}]
    ids, mask = render_chat(chat, vocab)
    assert parse_chat(ids, vocab) == chat
    assert ids.count(END) == 3  # the newline inside a message did not end a turn
    # Only the assistant's text and its <|end|> are trained on.
    assert vocab.decode([i for i, m in zip(ids, mask) if m]) == "hello<|end|>"


def test_literal_special_token_typed_by_user_stays_text():
    vocab = Vocab.from_text("<|bot>end")
    ids, _ = render_chat([{"role": "user", "content": "<|bot|>"}], vocab, add_generation_prompt=True)
    assert ids.count(BOT) == 1 and ids[-1] == BOT  # only the generation prompt is a real turn
    assert parse_chat(ids, vocab)[0]["content"] == "<|bot|>"


def test_unknown_role_is_refused(vocab):
    with pytest.raises(ValueError, match="unknown chat role"):
        render_chat([{"role": "robot", "content": "x"}], vocab)


# --- the transformer ----------------------------------------------------------------------------
def test_changing_a_later_character_never_changes_earlier_logits(vocab):
    net = tiny_model(vocab).eval()
    a = torch.randint(len(vocab), (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % len(vocab)
    la, _ = net(a)
    lb, _ = net(b)
    assert torch.equal(la[0, :10], lb[0, :10])
    assert not torch.allclose(la[0, 10:], lb[0, 10:])


def test_loss_ignores_masked_targets(vocab):
    net = tiny_model(vocab)
    x = torch.randint(len(vocab), (2, 8))
    y = torch.randint(len(vocab), (2, 8))
    masked = y.clone()
    masked[:, :4] = -1
    logits, loss = net(x, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, len(vocab)), y[:, 4:].reshape(-1))
    assert torch.allclose(loss, expected)


def test_input_embedding_and_output_head_are_tied(vocab):
    net = tiny_model(vocab)
    assert net.head.weight is net.tok_emb.weight


# --- generation ---------------------------------------------------------------------------------
def _generation_logits(net, prompt, steps, use_cache, monkeypatch):
    seen = []
    real_sample = sample

    def recording_sample(logits, *args, **kwargs):
        seen.append(logits.clone())
        return real_sample(logits, *args, **kwargs)

    monkeypatch.setattr(engine, "sample", recording_sample)
    ids = list(generate(net, prompt, steps, temperature=0, stop_ids=(), use_cache=use_cache))
    monkeypatch.setattr(engine, "sample", real_sample)
    return ids, seen


@pytest.mark.parametrize("prompt_len,steps", [(5, 8), (40, 45)])  # inside, then far past, the window
def test_cached_and_uncached_generation_agree(vocab, monkeypatch, prompt_len, steps):
    net = tiny_model(vocab)
    prompt = torch.randint(len(vocab), (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    ids_c, logits_c = _generation_logits(net, prompt, steps, True, monkeypatch)
    ids_u, logits_u = _generation_logits(net, prompt, steps, False, monkeypatch)
    assert ids_c == ids_u and len(ids_c) == steps
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
    stream = generate(net, [USER, BOT], 20, temperature=0)
    assert next(stream) == END
    assert list(stream) == []


def test_generate_refuses_an_empty_prompt(vocab):
    with pytest.raises(ValueError, match="at least one prompt id"):
        list(generate(tiny_model(vocab), [], 5))


# --- sampling -----------------------------------------------------------------------------------
LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, 2.5, -1.0])


def test_temperature_zero_is_argmax():
    assert sample(LOGITS, temperature=0) == 1


def test_top_k_never_picks_outside_the_k_most_likely():
    g = torch.Generator().manual_seed(0)
    picks = {sample(LOGITS, temperature=2.0, top_k=3, generator=g) for _ in range(300)}
    assert picks == {1, 4, 2}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    g = torch.Generator().manual_seed(0)
    picks = {sample(probs.log(), top_p=0.8, generator=g) for _ in range(300)}
    assert picks == {0, 1}  # 0.5 + 0.3 reaches 0.8; the 0.15 id is not needed
    picks = {sample(probs.log(), top_p=0.81, generator=g) for _ in range(300)}
    assert picks == {0, 1, 2}


def test_same_seed_gives_same_text(vocab):
    net = tiny_model(vocab)
    runs = [list(generate(net, [USER, 7, 8, BOT], 30, temperature=1.0, top_p=0.95,
                            generator=torch.Generator().manual_seed(42), stop_ids=())) for _ in range(2)]
    assert runs[0] == runs[1]


def test_repetition_penalty_lowers_recent_ids():
    assert sample(LOGITS, temperature=0, repetition_penalty=2.0, recent_ids=[1]) == 4
    assert sample(LOGITS, temperature=0, repetition_penalty=1.0, recent_ids=[1]) == 1


def test_sample_does_not_modify_its_input():
    logits = LOGITS.clone()
    sample(logits, temperature=0.5, top_k=2, top_p=0.5, repetition_penalty=1.5, recent_ids=[1, 2])
    assert torch.equal(logits, LOGITS)


# --- checkpoints --------------------------------------------------------------------------------
def test_save_then_load_gives_identical_tensors_and_values(tmp_path):
    path = str(tmp_path / "Model.pth")
    net, vocab = tiny_checkpoint(path)
    ckpt = load_checkpoint(path)
    assert ckpt["format_version"] == FORMAT_VERSION and ckpt["vocab"] == vocab.chars
    loaded, loaded_vocab = build_model(ckpt)
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.config == net.config
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # runs at unpickling time if anything lets it


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker, path = tmp_path / "pwned", str(tmp_path / "evil.pth")
    torch.save({"format": "luminaai", "format_version": FORMAT_VERSION, "x": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_and_corrupt_files_get_a_message(tmp_path):
    path = str(tmp_path / "Model.pth")
    tiny_checkpoint(path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    open(path, "wb").write(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_missing_foreign_and_newer_files_get_a_message(tmp_path):
    with pytest.raises(CheckpointError, match="python Train.py"):
        load_checkpoint(str(tmp_path / "Model.pth"))
    with pytest.raises(CheckpointError, match="python fine_tune.py"):
        load_checkpoint(str(tmp_path / "FineTuned_Model.pth"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a LuminaAI checkpoint"):
        load_checkpoint(str(tmp_path / "other.pth"))
    torch.save({"format": "luminaai", "format_version": 99}, tmp_path / "new.pth")
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(str(tmp_path / "new.pth"))


def test_older_format_and_misfit_weights_get_a_message(tmp_path):
    path = str(tmp_path / "Model.pth")
    tiny_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "format_version": 1}, tmp_path / "old.pth")
    with pytest.raises(CheckpointError, match="older LuminaAI.*retrain"):
        load_checkpoint(str(tmp_path / "old.pth"))
    weights = dict(ckpt["model"])
    weights["blocks.0.mlp.up.weight"] = weights["blocks.0.mlp.up.weight"][:, :3]
    torch.save({**ckpt, "model": weights}, tmp_path / "misshapen.pth")
    with pytest.raises(CheckpointError, match="blocks.0.mlp.up.weight.*misshapen"):
        load_checkpoint(str(tmp_path / "misshapen.pth"))
    torch.save({**ckpt, "vocab": ckpt["vocab"][:-1]}, tmp_path / "short_vocab.pth")
    with pytest.raises(CheckpointError, match="vocabulary"):
        load_checkpoint(str(tmp_path / "short_vocab.pth"))
    torch.save({k: v for k, v in ckpt.items() if k != "model_config"}, tmp_path / "no_config.pth")
    with pytest.raises(CheckpointError, match="model config"):
        load_checkpoint(str(tmp_path / "no_config.pth"))


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "Model.pth")
    tiny_checkpoint(path, seed=0)
    before = open(path, "rb").read()

    def disk_full(obj, f, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(path, {"x": 1})
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["Model.pth"]


# --- vocabulary expansion -----------------------------------------------------------------------
def test_expansion_keeps_old_rows_and_logits(vocab):
    net = tiny_model(vocab).eval()
    old_rows = net.tok_emb.weight.detach().clone()
    x = torch.tensor([vocab.encode("hello there")])
    before, _ = net(x)
    new_vocab = expand_vocab(net, vocab, ["ü", "ß", "a"])  # "a" is already known
    assert new_vocab.chars == vocab.chars + ["ü", "ß"]
    assert new_vocab.encode("hello") == vocab.encode("hello")
    assert torch.equal(net.tok_emb.weight[: len(vocab)], old_rows)
    assert net.head.weight is net.tok_emb.weight and net.config.vocab_size == len(vocab) + 2
    after, _ = net(x)
    assert torch.allclose(after[..., : len(vocab)], before, atol=1e-6)
    new_rows = net.tok_emb.weight[len(vocab):]
    assert torch.allclose(new_rows[0], old_rows[len(SPECIAL_TOKENS):].mean(0))


# --- devices and default checkpoints --------------------------------------------------------------
def test_an_unavailable_device_is_an_error_not_a_fallback():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="not available"):
        pick_device("cuda")
    with pytest.raises(ValueError, match="device must be auto, cuda, cuda:N, mps or cpu"):
        pick_device("tpu")
    assert pick_device("auto").type in ("mps", "cpu")


def test_default_checkpoint_prefers_the_fine_tuned_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_checkpoint() == "Model.pth" and default_checkpoint("x.pth") == "x.pth"
    (tmp_path / "FineTuned_Model.pth").write_bytes(b"")
    assert default_checkpoint() == "FineTuned_Model.pth"


def test_importing_the_library_has_no_side_effects(tmp_path):
    import subprocess
    import sys
    modules = "; ".join(f"import lumina.{name}" for name in ("vocab", "model", "engine", "checkpoint", "adapt", "device",
                                                                "optim", "corpus", "evaluate", "training"))
    out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); {modules}"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""
    assert os.listdir(tmp_path) == []


# --- batched generation ---------------------------------------------------------------------------
def test_a_batched_step_gives_each_row_exactly_what_it_gets_alone(vocab):
    """advance() over rows of different lengths, joining at different times and re-reading their
    windows at different steps, gives every row the ids generate() gives it alone."""
    net = tiny_model(vocab)  # random weights: greedy would repeat one id, so every row samples
    prompts = [torch.randint(len(SPECIAL_TOKENS), len(vocab), (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (3, 9, 15, 30)]
    settings = [dict(temperature=1.0), dict(temperature=1.0, top_k=5), dict(temperature=0.7, top_p=0.9),
                dict(temperature=1.2, repetition_penalty=1.3)]
    solo = [list(generate(net, p, 40, stop_ids=(), generator=torch.Generator().manual_seed(i), **s))
            for i, (p, s) in enumerate(zip(prompts, settings))]
    cache = new_cache(net, slots=6)
    rows = [Row(list(p), 40, slot=slot, generator=torch.Generator().manual_seed(i), stop_ids=(), **s)
            for i, (p, s, slot) in enumerate(zip(prompts, settings, (5, 0, 3, 1)))]
    running, step = [], 0
    while step < 7 * len(rows) or any(not row.done for row in running):
        running += [rows[step // 7]] if step % 7 == 0 and step // 7 < len(rows) else []  # join one by one
        advance(net, cache, [row for row in running if not row.done])
        step += 1
    assert len({tuple(ids) for ids in solo}) == len(solo) and all(len(set(ids)) > 3 for ids in solo)
    assert [row.ids[len(p):] for row, p in zip(rows, prompts)] == solo


# --- beam search ----------------------------------------------------------------------------------
class Bigram(torch.nn.Module):
    """A stand-in model whose next-id probabilities depend on the last id alone, read from a table,
    so the best reply can be worked out by hand. It keeps the cache's lengths as the real one does."""

    def __init__(self, table, vocab_size, seq_length=32):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, hidden_size=2, num_layers=1, nhead=1, seq_length=seq_length)
        self.tok_emb = torch.nn.Embedding(vocab_size, 2)  # where new_cache reads the device and dtype
        self.logits = torch.full((vocab_size, vocab_size), -30.0)  # "never", without -inf arithmetic
        for (after, token), p in table.items():
            self.logits[after, token] = float(torch.tensor(p).log())

    def forward(self, idx, cache=None, slots=None):
        for s in slots or range(idx.shape[0]):
            cache.lengths[s] += idx.shape[1]
        return self.logits[idx], None


def test_beam_search_finds_the_likelier_reply_that_greedy_misses():
    A, B, C = 5, 6, 7
    # Greedy takes A (0.6), then C (0.55), then <|end|>: 0.6 * 0.55 = 0.33.
    # B then <|end|> is likelier, 0.4 * 0.9 = 0.36, but B looked worse at the first step.
    net = Bigram({(BOT, A): 0.6, (BOT, B): 0.4, (A, C): 0.55, (A, END): 0.45, (B, END): 0.9,
                  (B, C): 0.1, (C, END): 1.0}, vocab_size=8)
    prompt = [USER, A, BOT]
    greedy = Row(list(prompt), 10, temperature=0)
    cache = KVCache(net.config)
    while not greedy.done:
        advance(net, cache, [greedy])
    assert greedy.ids[len(prompt):] == [A, C, END]
    assert beam_search(net, prompt, 10, num_beams=2, length_penalty=0) == [B, END]
    # A length penalty of 1 scores log p per character: A C <|end|> (-0.37) now beats B <|end|> (-0.51).
    assert beam_search(net, prompt, 10, num_beams=2, length_penalty=1) == [A, C, END]


def test_one_beam_is_greedy_and_beams_read_the_prompt_once(vocab):
    """On a real model, across a window re-read: num_beams=1 gives greedy's ids exactly; more beams
    find a reply at least as likely; the prompt goes through the model once however many beams."""
    net = tiny_model(vocab, seq_length=16).eval()
    prompt = [USER, 7, 8, 9, BOT]
    greedy = list(generate(net, prompt, 30, temperature=0, stop_ids=()))
    assert beam_search(net, prompt, 30, num_beams=1, stop_ids=()) == greedy

    def log_prob(new):  # uncached, one window: the prompt stays inside it for 11 ids
        out, _ = net(torch.tensor([prompt + new]))
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


# --- LoRA -----------------------------------------------------------------------------------------
def test_lora_trains_adapters_not_the_block_matrices_and_merges_exactly(vocab):
    net = tiny_model(vocab)
    base = {k: v.clone() for k, v in model_state(net).items()}
    add_lora(freeze_all_but_new_rows(net), rank=4, alpha=8.0)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    adapters = [n for n in trainable if ".parametrizations.weight.0." in n]
    assert len(adapters) == 2 * 4 * net.config.num_layers  # a and b on qkv, proj, up and the MLP's proj
    assert not [n for n in trainable if n.startswith("blocks.") and n not in adapters and "norm" not in n]
    optimizer = make_optimizer(net, {**Train.CONFIG, "learning_rate": 1e-2}, torch.device("cpu"))
    x = torch.randint(len(SPECIAL_TOKENS), len(vocab), (4, 16))
    for _ in range(5):
        net(x[:, :-1], x[:, 1:])[1].backward()
        for each in optimizer.optimizers:
            each.step()
        optimizer.zero_grad()
    frozen, merged = model_state(net, merge=False), model_state(net)
    matrices = [n for n in base if n.startswith("blocks.") and n.endswith(("qkv.weight", "proj.weight", "up.weight"))]
    assert len(matrices) == 4 * net.config.num_layers
    embedding, special = frozen["tok_emb.weight"], len(SPECIAL_TOKENS)
    assert torch.equal(embedding[special:], base["tok_emb.weight"][special:])  # the characters' rows never moved
    assert not torch.equal(embedding[:special], base["tok_emb.weight"][:special])  # the chat tokens' rows learn
    for name in matrices:
        assert torch.equal(frozen[name], base[name])  # the base matrices never moved
        assert not torch.equal(merged[name], base[name])  # the saved file has the adapters in them
    plain = CharTransformer(net.config)
    plain.load_state_dict(merged)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x)[0], net.eval()(x)[0], atol=1e-5)
    again = add_lora(build_model({"vocab": vocab.chars, "model_config": dataclasses.asdict(net.config),
                                      "model": frozen})[0], rank=4, alpha=8.0)
    load_lora(again, lora_state(net), "state.pth")  # base + adapters, as a resumed run rebuilds them
    with torch.no_grad():
        assert torch.equal(again.eval()(x)[0], net(x)[0])
    with pytest.raises(CheckpointError, match="lora_rank"):
        load_lora(add_lora(tiny_model(vocab), rank=2, alpha=8.0), lora_state(net), "state.pth")
