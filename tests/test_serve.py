"""serve.py, as its clients use it: the real server in a subprocess on a loopback port, the
official openai client, raw HTTP for bad input, concurrency for batching, and a real browser."""
import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from hypothesis import given, settings, strategies as st

import Train
from lumina import data
from lumina.checkpoint import load_checkpoint, load_for_chat, model_state, save_checkpoint
from lumina.engine import BeamSearch, Engine, Entry
from lumina.vocab import BOT, END, SPECIAL_TOKENS, SYSTEM, USER, Vocab, render_chat
from conftest import CHATS, DEVICE, KEY, tiny_model, ROOT, SERVE_PACKAGES, Server, need, ask, endless_checkpoint, free_port, run_script, write_jsonl

need(*SERVE_PACKAGES, allow_module_level=True)
import httpx  # noqa: E402
import openai  # noqa: E402


def trained_checkpoint(folder):
    """A tiny model trained for a few seconds on the test chats (Train.py's main(), here): its
    replies depend on the prompt, and its logits have real gaps, so greedy picks never hinge on rounding."""
    chats = write_jsonl(folder / "chats.jsonl", [{"messages": c} for c in CHATS * 30])
    Train.main([f"--data={chats}", f"--out_dir={folder}", "--max_iters=200", "--eval_interval=200", "--seq_length=64",
                "--hidden_size=32", "--num_layers=2", "--nhead=2", "--batch_size=8", "--max_minutes=0", "--probe_chars=0",
                f"--device={DEVICE}", "--dtype=float32", "--ngram_buckets=0"])
    return str(folder / "Model.pth")


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    server = Server(trained_checkpoint(tmp_path_factory.mktemp("trained")), f"--api_key={KEY}")
    yield server
    code, _, err = server.stop()
    assert code == 0 and "Traceback" not in err, err  # SIGTERM is a clean stop


# --- the API through the official client -----------------------------------------------------------
def test_plain_streamed_n_stop_seed_usage_and_models(sharp):
    client = sharp.client()
    assert [m.id for m in client.models.list().data] == ["Model"]
    plain = ask(client, "hello there", max_tokens=40, temperature=0)
    reply = plain.choices[0].message.content
    assert plain.object == "chat.completion" and plain.choices[0].finish_reason in ("stop", "length") and reply
    assert plain.usage.completion_tokens == len(reply) and plain.usage.prompt_tokens == len("hello there") + 3
    chunks = list(ask(client, "hello there", max_tokens=40, temperature=0, stream=True,
                      stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(reply)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    seeded = [ask(client, "hi", max_tokens=30, temperature=1.0, seed=7, n=2) for _ in range(2)]
    assert [c.message.content for c in seeded[0].choices] == [c.message.content for c in seeded[1].choices]
    assert len(seeded[0].choices) == 2 and seeded[0].choices[0].message.content != seeded[0].choices[1].message.content


def test_stop_strings_end_the_reply_and_are_never_sent(sharp):
    client = sharp.client()
    full = ask(client, "tell me", max_tokens=60, temperature=1.0, seed=1).choices[0].message.content
    assert len(full) >= 6
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = ask(client, "tell me", max_tokens=60, temperature=1.0, seed=1, stop=[stop, "zzzz"])
    assert cut.choices[0].message.content == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       ask(client, "tell me", max_tokens=60, temperature=1.0, seed=1, stop=stop, stream=True) if c.choices)
    assert streamed == full[:full.index(stop)]


def test_unknown_characters_are_dropped_and_counted_and_typed_tokens_stay_text(sharp):
    text = "héllo wörld <|bot|>"
    reply = httpx.post(sharp.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "Model", "messages": [{"role": "user", "content": text}], "max_tokens": 5}).json()
    vocab = Vocab(load_checkpoint(sharp.checkpoint)["vocab"])
    unknown = [c for c in text if c not in vocab.stoi]
    assert {"é", "ö", "<", "|", ">"} <= set(unknown) and reply["dropped_characters"] == len(unknown)
    # <|user|>, <|end|>, <|bot|> and the known characters: "bot" stayed three ordinary characters
    assert reply["usage"]["prompt_tokens"] == len(text) - len(unknown) + 3


# --- bad input -----------------------------------------------------------------------------------------
BAD = [
    (b"{not json", 400, None),
    ({"model": "Model", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "Model", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": "Model", "messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"model": "Model", "messages": []}, 400, "messages"),
    ({"model": "Model", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "Model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "Model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 9}, 400, "max_tokens"),
    ({"model": "Model", "messages": [{"role": "user", "content": "hi"}], "n": True}, 400, "n"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    (b"x" * 10_000_000, 413, None),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[f"{s}-{p}" for _, s, p in BAD])
def test_bad_input_gets_its_status_and_an_openai_shaped_error(sharp, body, status, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(sharp.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}",
                          "Content-Type": "application/json"}, timeout=60, **kwargs)
    error = response.json()["error"]
    assert response.status_code == status and set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]
    assert sharp.health()["status"] == "ok"  # and it keeps serving


def test_keys_paths_and_the_neutral_fields_clients_send(sharp):
    with pytest.raises(openai.AuthenticationError):
        ask(sharp.client(key="wrong"), "hi", max_tokens=3)
    assert httpx.get(sharp.url + "/v1/models").status_code == 401
    assert httpx.get(sharp.url + "/health").status_code == 200 and httpx.get(sharp.url + "/").status_code == 200
    missing = httpx.get(sharp.url + "/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    ok = ask(sharp.client(), "hi", max_tokens=3, frequency_penalty=0, presence_penalty=0)
    assert ok.choices[0].message.content is not None
    parts = httpx.post(sharp.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
        "model": "Model", "max_tokens": 10, "temperature": 0,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]}]})
    assert parts.json()["choices"][0]["message"]["content"] == ask(sharp.client(), "hello there", max_tokens=10,
                                                                   temperature=0).choices[0].message.content


def test_history_longer_than_the_window_is_cut_by_whole_turns_not_refused(sharp):
    turns = [{"role": "system", "content": "be brief"}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " * 2} for i in range(21)]
    reply = sharp.client().chat.completions.create(model="Model", messages=turns, max_tokens=5)
    assert reply.usage.prompt_tokens <= 48  # 3/4 of the 64-character window
    vocab = Vocab(load_checkpoint(sharp.checkpoint)["vocab"])
    ids, _ = render_chat(turns[:1] + turns[-1:], vocab, True)
    assert reply.usage.prompt_tokens >= len(ids)  # the system prompt and the newest turn stayed


# --- continuous batching -------------------------------------------------------------------------------
def test_sixteen_concurrent_requests_get_exactly_their_solo_replies(sharp):
    client = sharp.client()
    asks = [dict(text=f"question number {i} " + "abc"[: i % 3], max_tokens=30 + 3 * i,
                 **({"temperature": 0} if i % 2 else {"temperature": 1.0, "seed": i})) for i in range(16)]
    call = lambda a: ask(client, a["text"], **{k: v for k, v in a.items() if k != "text"}).choices[0].message.content
    solo = [call(a) for a in asks]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(call, asks))
    assert together == solo
    assert len(set(solo)) > 8  # the replies really differ, so equality means something


COMPILED_START_SECONDS = 300  # compiling both graphs from a cold cache took over a minute on two busy cores


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_compiled_server_sends_the_eager_servers_seeded_replies(sharp, dtype):
    """--compile=True compiles the decode step for each bucket of rows at start (1 and 2 here);
    seeded replies, served two at a time, are the eager server's."""
    compiled = Server(sharp.checkpoint, f"--api_key={KEY}", "--max_batch=2", "--compile=True", f"--dtype={dtype}",
                      start_seconds=COMPILED_START_SECONDS)
    eager = sharp if dtype == "float32" else Server(sharp.checkpoint, f"--api_key={KEY}", "--dtype=bfloat16")
    try:
        replies = [[c.message.content for c in ask(server.client(), "hi there", max_tokens=40, temperature=1.0,
                                                   seed=3, n=2).choices] for server in (eager, compiled)]
        logprob_replies = []
        for server in (eager, compiled):  # log-probs under each precision, compiled or not
            choices = ask(server.client(), "hi there", max_tokens=40, temperature=1.0, seed=3, n=2, logprobs=True,
                          top_logprobs=3).choices
            logprob_replies.append([c.message.content for c in choices])
            for c in choices:
                check_logprobs(c.logprobs.content, c.message.content, *uncached_logprobs(sharp.checkpoint, "hi there",
                               c.message.content, dtype), k=3)
    finally:
        code, out, err = compiled.stop()
        if eager is not sharp:
            eager.stop()
    assert replies[0] == replies[1] and len(set(replies[0])) == 2
    assert code == 0 and "\ncompile on (asked true)\n" in out and "Traceback" not in err, err
    assert logprob_replies[0] == logprob_replies[1] == replies[0]  # log-probs in the step change no draw


def test_a_server_on_two_threads_times_which_steps_run_on_one_and_sends_the_same_seeded_replies(sharp):
    """--threads=0 (auto) with torch on two threads: serve.py times one thread against two for each
    bucket of rows, says what it chose, and the seeded replies are the one-thread server's."""
    auto = Server(sharp.checkpoint, f"--api_key={KEY}", "--max_batch=4", "--threads=0", env={"OMP_NUM_THREADS": "2"})
    try:
        replies = [[c.message.content for c in ask(server.client(), "hi there", max_tokens=40, temperature=1.0,
                                                   seed=5, n=3).choices] for server in (sharp, auto)]
    finally:
        code, out, err = auto.stop()
    assert replies[0] == replies[1] and len(set(replies[0])) == 3
    line = next(line for line in out.splitlines() if line.startswith("threads "))
    assert re.fullmatch(r"threads (1|2|1 for steps of up to [12] of 4 rows, 2 above) \(asked auto: a character \(rows "
                        r"1(/2(/4)?)?\) took [0-9./]+ ms on 1 thread, [0-9./]+ ms on 2\)", line), line
    assert code == 0 and "Traceback" not in err, err


def uncached_logprobs(checkpoint, text, reply, dtype="float32"):
    """(log-softmax (len(reply), vocab) of one uncached forward of the prompt and reply, the reply's
    ids, the tolerance for that precision): what every logprob of the reply must be."""
    net, vocab, _ = load_for_chat(checkpoint, DEVICE)
    prompt, _ = render_chat([{"role": "user", "content": text}], vocab, add_generation_prompt=True)
    ids = prompt + vocab.encode(reply)
    with torch.no_grad(), torch.autocast(DEVICE, getattr(torch, dtype), enabled=dtype != "float32"):
        out, _ = net.to(getattr(torch, dtype))(torch.tensor([ids], device=DEVICE))
    return out[0, len(prompt) - 1:len(ids) - 1].float().log_softmax(-1), ids[len(prompt):], 1e-4 if dtype == "float32" else 0.1


def check_logprobs(content, reply, expected, ids, tolerance, k, greedy=False):
    """OpenAI's logprobs content of a reply: one entry per character spelling the reply, each the
    model's own log-prob, with k alternatives, likeliest first (greedy: the chosen one first)."""
    assert "".join(entry.token for entry in content) == reply and len(content) == len(ids)
    for t, entry in enumerate(content):
        assert abs(entry.logprob - expected[t, ids[t]].item()) < tolerance, (t, entry.logprob, expected[t, ids[t]])
        assert entry.bytes == list(entry.token.encode("utf-8")) and len(entry.top_logprobs) == k
        alternatives = [a.logprob for a in entry.top_logprobs]
        assert alternatives == sorted(alternatives, reverse=True)
        if greedy and k:
            assert entry.top_logprobs[0].token == entry.token


def test_logprobs_in_openais_shape_streamed_or_not_for_n_stops_and_beams(sharp):
    client = sharp.client()
    text = "hello there"
    sampled = ask(client, text, max_tokens=40, temperature=1.0, seed=5, n=2, logprobs=True, top_logprobs=3)
    for choice in sampled.choices:
        check_logprobs(choice.logprobs.content, choice.message.content,
                       *uncached_logprobs(sharp.checkpoint, text, choice.message.content), k=3)
    greedy = ask(client, text, max_tokens=40, temperature=0, logprobs=True, top_logprobs=5).choices[0]
    check_logprobs(greedy.logprobs.content, greedy.message.content,
                   *uncached_logprobs(sharp.checkpoint, text, greedy.message.content), k=5, greedy=True)
    bare = ask(client, text, max_tokens=40, temperature=0, logprobs=True).choices[0]
    assert [e.logprob for e in bare.logprobs.content] == [e.logprob for e in greedy.logprobs.content]
    assert all(e.top_logprobs == [] for e in bare.logprobs.content)
    assert ask(client, text, max_tokens=10).choices[0].logprobs is None  # off: none
    # Streamed, with a stop string cutting the reply: the entries spell exactly the text sent.
    full = sampled.choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]
    chunks = [c for c in ask(client, text, max_tokens=40, temperature=1.0, seed=5, stop=stop, stream=True,
                             logprobs=True, top_logprobs=2) if c.choices]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    content = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == full[:full.index(stop)]
    check_logprobs(content, streamed, *uncached_logprobs(sharp.checkpoint, text, streamed), k=2)
    beams = ask(client, text, max_tokens=40, n=2, logprobs=True, top_logprobs=1, extra_body={"num_beams": 3})
    for choice in beams.choices:
        check_logprobs(choice.logprobs.content, choice.message.content,
                       *uncached_logprobs(sharp.checkpoint, text, choice.message.content), k=1)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(width=32, max_value=0.0, min_value=-9999.0), min_size=1, max_size=6),
       st.sampled_from(['"', "\\", "\u00e9", "a", "\n"]))
def test_a_log_prob_entry_is_json_that_gives_back_each_float32_exactly(logprobs, char):
    import serve
    vocab = Vocab(['"', "\\", "\u00e9", "a", "\n"])
    tokens, i = serve.token_table(vocab), vocab.stoi[char]
    entry = json.loads(serve.entry_json(tokens, i, Entry(logprobs[0], [(i, lp) for lp in logprobs[1:]])))
    assert entry["token"] == char and bytes(entry["bytes"]).decode("utf-8") == char
    sent = [entry["logprob"]] + [a["logprob"] for a in entry["top_logprobs"]]
    assert torch.tensor(sent, dtype=torch.float32).tolist() == logprobs  # 9 digits: each float32 exactly
    assert all(a["token"] == char for a in entry["top_logprobs"])


@pytest.mark.parametrize("body,param", [({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                                        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
                                        ({"top_logprobs": 2}, "top_logprobs"),
                                        ({"logprobs": "yes"}, "logprobs")])
def test_bad_logprobs_fields_are_refused_by_name(sharp, body, param):
    answer = httpx.post(sharp.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
        "model": "Model", "messages": [{"role": "user", "content": "hi"}], **body})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param


def test_beam_search_choices_are_model_pys_best_beams_even_beside_other_clients(sharp):
    net, vocab, _ = load_for_chat(sharp.checkpoint, DEVICE)
    ids, _ = render_chat([{"role": "user", "content": "hello there"}], vocab, add_generation_prompt=True)
    search = BeamSearch(ids, 40, range(4), 1.0, (END, USER, BOT, SYSTEM))
    expected = [vocab.decode([t for t in new if t >= len(SPECIAL_TOKENS)]) for _, new, _ in search.run(Engine(net, 4))]
    client = sharp.client()
    beams = lambda **kw: ask(client, "hello there", max_tokens=40, n=2, extra_body={"num_beams": 4}, **kw)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # sampled requests share its steps
        others = [pool.submit(ask, client, f"other {i}", max_tokens=60, temperature=1.0) for i in range(3)]
        reply = beams()
        assert all(o.result().choices for o in others)
    assert [c.message.content for c in reply.choices] == expected[:2] and expected[0] != expected[1]
    streamed = list(beams(stream=True))
    assert ["".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i)
            for i in (0, 1)] == expected[:2]
    too_many = httpx.post(sharp.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
        "model": "Model", "messages": [{"role": "user", "content": "hi"}], "n": 3, "num_beams": 2})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    """A model that never ends its turn, served one sequence at a time with a queue of one."""
    path = endless_checkpoint(tmp_path_factory.mktemp("endless") / "Model.pth")
    server = Server(path, "--max_batch=1", "--max_queue=1", "--max_tokens_limit=1000000")
    yield server
    server.stop()


def test_a_client_that_disconnects_frees_its_slot(endless):
    with httpx.stream("POST", endless.url + "/v1/chat/completions", timeout=60, json={
            "model": "Model", "messages": [{"role": "user", "content": "go"}], "max_tokens": 1000000,
            "stream": True}) as response:
        for _ in zip(range(5), response.iter_lines()):
            pass  # it is streaming; now hang up, a million characters early
    start = time.time()
    later = ask(endless.client(), "next", max_tokens=20)  # with one slot, this waits unless it was freed
    assert len(later.choices[0].message.content) == 20 and time.time() - start < 30
    assert endless.health()["running"] == 0


def test_a_full_queue_answers_429_and_accepted_requests_complete(endless):
    results = {}

    def run(name, tokens):
        results[name] = ask(endless.client(), name, max_tokens=tokens).choices[0].message.content

    first = threading.Thread(target=run, args=("first", 3000))
    first.start()
    while endless.health()["running"] < 1:
        time.sleep(0.05)
    second = threading.Thread(target=run, args=("second", 20))
    second.start()
    while endless.health()["waiting"] < 1:
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError, match="queue is full"):
        ask(endless.client(), "third", max_tokens=5)
    first.join(120)
    second.join(120)
    assert len(results["first"]) == 3000 and len(results["second"]) == 20


# --- start-up errors and shutdown ----------------------------------------------------------------------
def test_missing_checkpoint_and_bad_keys_exit_with_a_message(tmp_path, capsys):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py")], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode != 0 and "Model.pth not found: run `python Train.py` first" in out.stderr
    with pytest.raises(SystemExit) as refused:  # here: a fresh interpreter cost more than the check
        serve_module().main(["--max_batch=0"])
    assert refused.value.code == 2 and "max_batch must be between 1 and 1024" in capsys.readouterr().err


def test_ctrl_c_finishes_the_reply_in_flight_then_exits_0(tmp_path):
    # A minute to finish: 2,000 characters took over the default 10 s on a 2-core machine running other tests.
    server = Server(endless_checkpoint(tmp_path / "Model.pth"), "--shutdown_seconds=60")
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=ask(server.client(), "go", max_tokens=2000)))
    worker.start()
    while server.health()["running"] < 1:
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGINT)
    worker.join(60)
    out, err = server.proc.communicate(timeout=60)  # it exits by itself once the reply is out (a second
    code = server.proc.returncode                    # signal here raced with that exit: flaky, seen once)
    assert code == 0 and "Traceback" not in err and "stopped" in out
    assert len(result["r"].choices[0].message.content) == 2000


# --- the page, in a real browser -----------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="no chromium here (.ci/run installs it)")
def test_the_page_streams_a_reply_stops_it_and_clears(endless, tmp_path):
    from playwright.sync_api import expect, sync_playwright
    server = endless  # its one slot is free: its other tests' requests have ended
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page()
        page.goto(server.url + "/")
        assert page.locator("#compare").is_hidden()  # no --pairs_file: no compare
        page.fill("#max_tokens", "1000000")
        page.fill("#input", "hello there")
        page.click("#send")
        reply = page.locator(".msg.assistant")
        expect(reply).not_to_have_text("", timeout=20000)
        first = len(reply.inner_text())
        page.wait_for_function("n => document.querySelector('.msg.assistant').textContent.length > n + 50", arg=first)
        assert server.health()["running"] == 1  # still writing, on the server
        page.click("#stop")
        expect(page.locator("#stop")).to_be_disabled()
        deadline = time.time() + 10
        while server.health()["running"] and time.time() < deadline:
            time.sleep(0.1)
        assert server.health()["running"] == 0  # Stop cancelled the generation on the server
        stopped = reply.inner_text()
        time.sleep(0.5)
        assert reply.inner_text() == stopped and len(stopped) > 50
        page.screenshot(path=str(tmp_path / "page.png"))
        page.click("#clear")
        expect(page.locator(".msg")).to_have_count(0)
        browser.close()


@pytest.fixture(scope="module")
def lab(sharp, tmp_path_factory):
    """The trained model served with --pairs_file: (server, the pairs file)."""
    pairs_file = tmp_path_factory.mktemp("lab") / "pairs.jsonl"
    server = Server(sharp.checkpoint, f"--pairs_file={pairs_file}")
    yield server, pairs_file
    server.stop()


def one_layer_checkpoint(path):
    net, vocab = tiny_model_and_vocab(num_layers=1, seq_length=64)
    save_checkpoint(path, {"stage": "train", "vocab": vocab.chars, "model_config": dataclasses.asdict(net.config),
                           "model": model_state(net), "config": {}, "metrics": {}})
    return str(path)


def tiny_model_and_vocab(**shape):
    vocab = Vocab.from_text("abcdefghijklmnopqrstuvwxyz !?.,\n")
    return tiny_model(vocab, seed=3, **shape), vocab


def rotate(x, t, base=10000.0):
    """Rotary positions by hand: pair i = (x[i], x[i + half]) of position t turns by t * base^(-i/half)."""
    half = x.shape[-1] // 2
    angle = t * base ** (-torch.arange(half, dtype=torch.float32) / half)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], dim=-1)


def test_the_attention_view_is_a_hand_computed_one_layer_models(tmp_path):
    """POST /lumina/attention on a one-layer model: each head's weights are softmax(q.k / sqrt(d))
    of the query that wrote the character over every character before it, worked out here from
    the weights by hand; they sum to 1; the log-probs are an uncached forward's."""
    path = one_layer_checkpoint(tmp_path / "Model.pth")
    net, vocab, _ = load_for_chat(path, "cpu")
    server = Server(path)
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello, how are you?"}]
    try:
        answer = httpx.post(server.url + "/lumina/attention", json={"messages": messages, "position": 7}).json()
    finally:
        server.stop()
    prompt, _ = render_chat(messages[:1], vocab, add_generation_prompt=True)
    ids = prompt + vocab.encode(messages[1]["content"])
    target = len(prompt) + 7
    assert answer["token"] == "h" and answer["tokens"] == [vocab.itos[i] for i in ids[:target]]
    assert answer["reply_start"] == len(prompt)
    with torch.no_grad():
        block, x = net.blocks[0], net.tok_emb(torch.tensor(ids[:target]))
        q, k, _ = block.attn.qkv(block.norm1(x)).view(target, 3, 2, 16).unbind(1)  # (T, nhead, head_dim) each
        for head in range(2):
            keys = torch.stack([rotate(k[t, head], t) for t in range(target)])
            expected = (keys @ rotate(q[target - 1, head], target - 1) / 4.0).softmax(-1)  # sqrt(16) = 4
            assert torch.allclose(torch.tensor(answer["attention"][0][head]), expected, atol=1e-5)
            assert abs(sum(answer["attention"][0][head]) - 1) < 1e-5
        logprobs = net(torch.tensor([ids]))[0][0, target - 1].log_softmax(-1)
    assert abs(answer["logprob"] - logprobs[ids[target]].item()) < 1e-5
    assert [a["logprob"] for a in answer["top_logprobs"]] == pytest.approx(logprobs.topk(10).values.tolist(), abs=1e-5)


@pytest.mark.parametrize("body,status,param", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}], "position": 3}, 400, "position"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}], "position": -1}, 400, "position"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}, 400, "position"),
    ({"messages": [{"role": "user", "content": "hi"}], "position": 0}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "h\u00e9"}], "position": 0}, 400, "messages"),
    ({"messages": [{"role": "assistant", "content": "hey"}], "position": 0, "layer": 2}, 400, "layer")])
def test_bad_attention_requests_are_refused_by_name(lab, body, status, param):
    answer = httpx.post(lab[0].url + "/lumina/attention", content=json.dumps(body).replace("\\\\u", "\\u"),
                        headers={"Content-Type": "application/json"})
    assert answer.status_code == status and answer.json()["error"]["param"] == param, answer.text


PAIR = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello!", "rejected": "hello"}


@pytest.mark.parametrize("body,status", [
    ({**PAIR, "prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400),  # no user turn last
    ({**PAIR, "rejected": "hello!"}, 400),         # the same text twice
    ({**PAIR, "chosen": "  "}, 400),               # an empty reply
    ({"prompt": PAIR["prompt"], "chosen": "a"}, 400),  # no rejected
    ({**PAIR, "chosen": 5}, 400),
    ({**PAIR, "chosen": "a\u0000b"}, 400),        # a NUL: a line the reader would skip
    ({**PAIR, "ranks": [0, 1]}, 400),              # a field the endpoint does not take
    ({**PAIR, "chosen": "x" * 100001}, 413),       # past MAX_PAIR_CHARS
    ([PAIR], 400)])
def test_bad_pairs_are_refused_and_the_file_keeps_only_whole_valid_lines(lab, body, status):
    server, pairs_file = lab
    before = pairs_file.read_bytes() if pairs_file.exists() else b""
    answer = httpx.post(server.url + "/lumina/pairs", content=json.dumps(body).replace("\\\\u", "\\u"),
                        headers={"Content-Type": "application/json"})
    assert answer.status_code == status and "error" in answer.json(), answer.text
    assert (pairs_file.read_bytes() if pairs_file.exists() else b"") == before


@settings(max_examples=25, deadline=None)
@given(body=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                             st.sampled_from(["prompt", "chosen", "rejected", "role", "content", "x"]), inner, max_size=4),
                         max_leaves=12))
def test_any_json_posted_as_a_pair_is_saved_whole_or_refused_by_name(lab, body):
    """Hypothesis: whatever JSON comes, the answer is 200 or a 400/413 that names the problem, and
    every line in the file is one that fine_tune.py's reader keeps."""
    server, pairs_file = lab
    answer = httpx.post(server.url + "/lumina/pairs", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert answer.status_code in (200, 400, 413), answer.text
    assert answer.status_code == 200 or answer.json()["error"]["message"]
    if pairs_file.exists():
        problems = []
        assert len(data.read_pairs(str(pairs_file), problems)) == len(pairs_file.read_text().splitlines()) and not problems


def test_pairs_without_a_pairs_file_answer_404_and_good_ones_append_a_line(sharp, lab):
    answer = httpx.post(sharp.url + "/lumina/pairs", json=PAIR, headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 404 and "--pairs_file" in answer.json()["error"]["message"]
    server, pairs_file = lab
    before = pairs_file.read_text().splitlines() if pairs_file.exists() else []
    saved = [httpx.post(server.url + "/lumina/pairs", json=PAIR).json() for _ in range(2)]
    after = pairs_file.read_text().splitlines()
    assert after[:len(before)] == before and len(after) == len(before) + 2 and saved[1]["pairs"] == len(after)
    assert json.loads(after[-1]) == {"id": saved[1]["id"], "tree": saved[1]["id"], **PAIR}


def launch(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="no chromium here (.ci/run installs it)")
def test_the_lab_shades_explains_a_character_and_saves_the_pair_picked(sharp, tmp_path):
    """The page with --pairs_file: replies shaded by probability; a click shows the character's
    alternatives and each layer's and head's attention; Compare shows two replies, a pick appends one
    valid pair line, and fine_tune.py learns from that file with DPO."""
    from playwright.sync_api import expect, sync_playwright
    pairs_file = tmp_path / "pairs.jsonl"
    server = Server(sharp.checkpoint, f"--pairs_file={pairs_file}")
    try:
        with sync_playwright() as p:
            browser = launch(p)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.check("#shade")
            page.fill("#temperature", "0")
            page.fill("#input", "hello there")
            page.click("#send")
            expect(page.locator("#stop")).to_be_disabled(timeout=20000)
            chars = page.locator(".shade .msg.assistant .ch")
            reply = page.locator(".msg.assistant").inner_text()
            assert chars.count() == len(reply) > 3
            shades = {chars.nth(i).evaluate("s => getComputedStyle(s).backgroundColor") for i in range(chars.count())}
            assert len(shades) > 1  # characters the model was surer of look different
            chars.nth(2).click()
            expect(page.locator("#inspector")).to_be_visible()
            expect(page.locator("#alternatives .bar")).to_have_count(5)
            expect(page.locator("#attention-note")).to_contain_text("Most:", timeout=10000)
            assert page.locator("#written").inner_text().startswith(f"Wrote '{reply[2]}'")
            heads = page.evaluate("view.attention")  # [layer][head][position], drawn over view.tokens
            assert len(heads) == 2 and len(heads[0]) == 2 and page.locator("#window span").count() == len(heads[0][0]) + 1
            assert all(abs(sum(w) - 1) < 1e-4 for layer in heads for w in layer)
            page.select_option("#head", "0")  # one head instead of the mean: the shading follows it
            page.screenshot(path=os.environ.get("LUMINA_LAB_SCREENSHOT", str(tmp_path / "lab.png")))
            page.click("#close")
            page.fill("#temperature", "1")
            page.fill("#input", "what is 2+2?")
            page.click("#compare")
            expect(page.locator(".compare .choice")).to_have_count(2, timeout=20000)
            texts = [t.inner_text() for t in page.locator(".compare .msg.assistant").all()]
            page.locator(".compare .pick").nth(1).click()  # "B is better"
            expect(page.locator("#status")).to_contain_text("holds 1 pairs")
            expect(page.locator(".compare")).to_have_count(0)
            assert errors == []
            browser.close()
    finally:
        server.stop()
    lines = pairs_file.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert row["prompt"] == [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": reply},
                             {"role": "user", "content": "what is 2+2?"}]
    assert (row["chosen"], row["rejected"]) == (texts[1], texts[0]) and row["tree"].startswith("page-")
    out = run_script("fine_tune.py", f"--base_model={sharp.checkpoint}", f"--data={pairs_file}", "--epochs=0",
                     "--max_iters=2", "--eval_interval=2", "--max_minutes=0", "--probe_chars=0", f"--device={DEVICE}",
                     f"--output={tmp_path / 'DPO.pth'}", cwd=tmp_path)
    assert out.returncode == 0 and "objective auto: dpo" in out.stdout and "1 preference pairs" in out.stdout, out.stdout + out.stderr


# --- failures are contained: one request, one step, or the whole scheduler -------------------------------
class InProcess:
    """serve.py's app and scheduler in this process (uvicorn in a thread), so a test can make a
    chosen part of them fail."""

    def __init__(self, checkpoint, **config):
        import uvicorn
        import serve
        self.config = {**serve.CONFIG, "checkpoint": checkpoint, "device": DEVICE, "compile": 0, **config}
        net, vocab, _ = load_for_chat(checkpoint, DEVICE)
        self.scheduler = serve.Scheduler(net, vocab, self.config)
        self.scheduler.thread.start()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(serve.build_app(self.scheduler, self.config, "Model"),
                                                    host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def post(self, text, **fields):
        return httpx.post(self.url + "/v1/chat/completions", timeout=60, json={
            "model": "Model", "messages": [{"role": "user", "content": text}], **fields})

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def inprocess(tmp_path):
    servers = []
    yield lambda **config: servers.append(InProcess(endless_checkpoint(tmp_path / "Model.pth"), **config)) or servers[-1]
    for server in servers:
        server.close()


def logged_error(response, capfd, text):
    """The error id a 500 or 503 names, checked against the server's log: the log has the
    exception's text under that id, and the client is told only the id."""
    message = (response.json().get("error") or {}).get("message") or response.json()["reason"]
    error_id = re.search(r"error ([0-9a-f]{8})", message).group(1)
    log = capfd.readouterr().err
    assert text not in message and f"error {error_id}" in log and text in log.split(f"error {error_id}", 1)[1]
    return error_id


def test_one_requests_failure_fails_that_request_only(inprocess, monkeypatch, capfd):
    """A request's own work is setting up its sampling (its rows, seeds and settings) and checking
    its stop strings after each step: make each fail for one request while others run beside it."""
    import serve
    real_start, real_deliver = serve.Job.start, serve.Scheduler.deliver

    def start(job):
        if job.request.user == "bad sampling":
            raise ValueError("injected sampling failure")
        return real_start(job)

    def deliver(scheduler, job):
        if job.request.user == "bad stop check" and job.rows[0].new > 5:
            raise KeyError("injected stop-check failure")
        return real_deliver(scheduler, job)

    monkeypatch.setattr(serve.Job, "start", start)
    monkeypatch.setattr(serve.Scheduler, "deliver", deliver)
    server = inprocess(max_batch=4)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        good = [pool.submit(server.post, f"fine {i}", max_tokens=200) for i in range(2)]
        for user, message in (("bad sampling", "injected sampling failure"), ("bad stop check", "injected stop-check failure")):
            bad = server.post("fail", max_tokens=200, user=user)
            assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
            logged_error(bad, capfd, message)
        assert [len(g.result().json()["choices"][0]["message"]["content"]) for g in good] == [200, 200]
    streamed = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "Model", "messages": [{"role": "user", "content": "x"}], "stream": True, "user": "bad sampling"})
    assert '"error"' in streamed.text and streamed.text.rstrip().endswith("data: [DONE]")
    assert server.post("after", max_tokens=10).status_code == 200
    health = httpx.get(server.url + "/health").json()
    assert health["running"] == 0 and health["free_slots"] == 4  # the failed requests' slots are free


def test_a_failed_step_fails_its_requests_and_the_next_request_is_served(inprocess, capfd):
    server = inprocess(max_batch=4)
    net, failures = server.scheduler.net, []
    real_forward = net.forward

    def forward(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise RuntimeError("injected forward failure")
        return real_forward(*args, **kwargs)

    net.forward = forward
    failed = server.post("first", max_tokens=20)
    assert failed.status_code == 500
    logged_error(failed, capfd, "injected forward failure")
    served = server.post("second", max_tokens=20)
    assert served.status_code == 200 and len(served.json()["choices"][0]["message"]["content"]) == 20
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_dead_scheduler_answers_503_at_once_and_waits_for_nothing(inprocess, monkeypatch, capfd):
    import serve
    server = inprocess(max_batch=1, max_tokens_limit=10 ** 6)
    running = threading.Thread(target=lambda: results.append(server.post("long", max_tokens=10 ** 6)))
    results = []
    running.start()
    deadline = time.time() + 30
    while httpx.get(server.url + "/health").json()["running"] < 1 and time.time() < deadline:
        time.sleep(0.05)

    def broken(scheduler):
        raise RuntimeError("injected scheduler crash")

    monkeypatch.setattr(serve.Scheduler, "step", broken)
    running.join(30)
    assert results and results[0].status_code == 503
    error_id = logged_error(results[0], capfd, "injected scheduler crash")
    health = httpx.get(server.url + "/health")
    assert health.status_code == 503 and error_id in health.json()["reason"]
    start = time.time()
    refused = server.post("after", max_tokens=5)
    assert refused.status_code == 503 and time.time() - start < 5 and error_id in refused.json()["error"]["message"]


# --- hostile requests: none freezes the server, no other site drives it (issue 27) ---------------------
@pytest.fixture(scope="module")
def busy(tmp_path_factory):
    """The never-ending model with 16 slots: room for hostile requests and an ordinary one beside them."""
    server = Server(endless_checkpoint(tmp_path_factory.mktemp("busy") / "Model.pth"), "--max_batch=16",
                    "--max_tokens_limit=100000")
    yield server
    server.stop()


def health_while(server, request, seconds=3.0):
    """Send `request` (a function) in a thread and poll /health meanwhile: the slowest answer, and
    the request's response. An ordinary request must be served beside it too."""
    result, slowest = {}, 0.0
    worker = threading.Thread(target=lambda: result.update(r=request()))
    worker.start()
    deadline = time.time() + seconds
    while time.time() < deadline:
        start = time.perf_counter()
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        slowest = max(slowest, time.perf_counter() - start)
        time.sleep(0.05)
    ordinary = ask(server.client(), "hello", max_tokens=5)
    assert len(ordinary.choices[0].message.content) == 5
    worker.join(120)
    return slowest, result["r"]


def post(server, body, **headers):
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=120)


def test_long_stop_strings_are_refused_and_the_longest_allowed_cost_one_pass(busy):
    import serve
    huge = post(busy, {"model": "Model", "messages": [{"role": "user", "content": "go"}], "n": 16,
                       "stop": ["a" * 200_000] * 4, "max_tokens": 2000})
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "stop"
    longest = ["abcdefghij" * (serve.MAX_STOP_CHARS // 10)] * 4  # never completed: every character is checked
    slowest, response = health_while(busy, lambda: post(busy, {
        "model": "Model", "messages": [{"role": "user", "content": "go"}], "n": 16, "stop": longest, "max_tokens": 1500}),
        seconds=1.5)
    assert response.status_code == 200 and len(response.json()["choices"]) == 16
    assert slowest < 1.0  # the goal is 100 ms (benchmarks/hostile_requests.py); here, room for a busy machine


@given(stops=st.lists(st.text("ab", min_size=1, max_size=6), min_size=1, max_size=4),
       chunks=st.lists(st.text("abc", max_size=4), max_size=30))
@settings(max_examples=300, deadline=None)
def test_stop_text_matches_a_plain_search_character_by_character(stops, chunks):
    """The automaton against the obvious rule: the text ends where a stop string first ends (of two
    ending together, the longer), and all is released but the longest ending that could still grow
    into a stop string."""
    import serve
    text, released, full = serve.StopText(stops), "", ""
    for chunk in chunks:
        out, hit = text.add(chunk)
        released += out
        for char in chunk:
            full += char
            ends = [s for s in stops if full.endswith(s)]
            if ends:
                assert hit and text.text == full[:len(full) - max(map(len, ends))] and text.text.startswith(released)
                return
        held = max((k for s in stops for k in range(len(s)) if full.endswith(s[:k])), default=0)
        assert not hit and released == full[:len(full) - held]
    assert released + text.flush() == full


def test_a_megabyte_of_empty_messages_is_refused_or_served_without_stalling(busy):
    many = post(busy, {"model": "Model", "max_tokens": 5, "messages": [{"role": "user", "content": ""}] * 28_000})  # 1 MB
    assert many.status_code == 400 and "max_messages" in many.json()["error"]["message"]
    allowed = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x" * 900} for i in range(999)]
    slowest, response = health_while(busy, lambda: post(busy, {"model": "Model", "max_tokens": 5, "messages": allowed}),
                                     seconds=1.0)
    assert response.status_code == 200 and slowest < 1.0


def test_nested_json_gets_a_json_400_and_a_moved_checkpoint_still_lists(busy, tmp_path):
    deep = httpx.post(busy.url + "/v1/chat/completions", content=b"[" * 200_000 + b"]" * 200_000,
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert deep.status_code == 400 and "nested" in deep.json()["error"]["message"]
    moved = tmp_path / "moved.pth"
    os.replace(busy.checkpoint, moved)
    try:
        assert busy.client().models.list().data[0].id == "Model"
    finally:
        os.replace(moved, busy.checkpoint)


def test_other_sites_pages_content_types_and_rebinding_hosts_are_refused(busy):
    body = {"model": "Model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    evil = post(busy, body, Origin="http://evil.example")
    assert evil.status_code == 403 and "--allowed_origins=http://evil.example" in evil.json()["error"]["message"]
    plain = httpx.post(busy.url + "/v1/chat/completions", content=json.dumps(body), timeout=60,
                       headers={"Content-Type": "text/plain", "Origin": busy.url})  # a "simple" cross-site POST
    assert plain.status_code == 415
    rebound = httpx.get(busy.url + "/health", headers={"Host": f"evil.example:{busy.port}"})
    assert rebound.status_code == 403 and "DNS-rebinding" in rebound.json()["error"]["message"]
    assert post(busy, body, Origin=busy.url).status_code == 200  # the server's own page
    assert post(busy, body, Host=f"localhost:{busy.port}").status_code == 200


def test_an_allowed_origin_gets_cors_and_the_key_comes_from_the_environment(tmp_path):
    path = endless_checkpoint(tmp_path / "Model.pth")
    server = Server(path, "--allowed_origins=http://localhost:3000", env={"LUMINA_API_KEY": KEY})
    try:
        body = {"model": "Model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert post(server, body).status_code == 401
        ok = post(server, body, Authorization=f"Bearer {KEY}", Origin="http://localhost:3000")
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost:3000"
        preflight = httpx.options(server.url + "/v1/chat/completions", headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200
        assert post(server, body, Authorization=f"Bearer {KEY}", Origin="http://localhost:4000").status_code == 403
    finally:
        server.stop()


def test_health_says_503_while_every_step_fails_and_recovers(inprocess):
    server = inprocess(max_batch=2)
    real_forward, broken = server.scheduler.net.forward, [True]

    def forward(*args, **kwargs):
        if broken[0]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")  # sticky, on a GPU
        return real_forward(*args, **kwargs)

    server.scheduler.net.forward = forward
    for _ in range(serve_module().FAILING_STEPS):
        assert server.post("x", max_tokens=5).status_code == 500
    health = httpx.get(server.url + "/health")
    assert health.status_code == 503 and health.json()["status"] == "failing"
    broken[0] = False
    assert server.post("x", max_tokens=5).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200
    server.scheduler.stop_accepting()  # what SIGTERM does first
    health = httpx.get(server.url + "/health")
    assert health.status_code == 503 and health.json()["status"] == "shutting down"


def serve_module():
    import serve
    return serve


def test_a_full_queue_answers_429_before_building_the_prompt(inprocess, monkeypatch):
    server = inprocess(max_batch=1, max_queue=0, max_tokens_limit=10 ** 6)
    long = threading.Thread(target=lambda: server.post("long", max_tokens=3000))
    long.start()
    while httpx.get(server.url + "/health").json()["running"] < 1:
        time.sleep(0.05)
    built = []
    real = serve_module().prompt_for
    monkeypatch.setattr(serve_module(), "prompt_for", lambda *a: built.append(1) or real(*a))
    assert server.post("next", max_tokens=5).status_code == 429 and not built
    long.join(120)


def test_sigterm_ends_the_server_within_shutdown_seconds_whatever_is_in_flight(tmp_path):
    server = Server(endless_checkpoint(tmp_path / "Model.pth"), "--shutdown_seconds=1", "--max_tokens_limit=1000000")
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=post(server, {
        "model": "Model", "max_tokens": 1_000_000, "messages": [{"role": "user", "content": "go"}]})))
    worker.start()
    while server.health()["running"] < 1:
        time.sleep(0.05)
    start = time.time()
    server.proc.send_signal(signal.SIGTERM)
    out, err = server.proc.communicate(timeout=60)
    # 1 s, then the watchdog's margins; slack for a machine busy with other tests (6.3 s was seen there). Without
    # the cut-off, the million-character reply would run for many minutes.
    assert time.time() - start < 1 + 9 and server.proc.returncode == 0 and "Traceback" not in err
    assert "stopped" in out
    worker.join(60)
    assert result["r"].status_code == 503 and "shut down before this reply" in result["r"].json()["error"]["message"]


def test_the_page_is_its_own_file_and_starts_at_the_servers_sampling():
    import serve
    html = serve.chat_page({**serve.CONFIG, "temperature": 0.3, "max_tokens": 77}, "Model")
    assert "__" not in html.split("<script>")[1] and '"temperature": 0.3' in html and '"max_tokens": 77' in html
    assert html.startswith("<!doctype html>") and "<script src" not in html and "http" not in html.split("<script>")[1]
