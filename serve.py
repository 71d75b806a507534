"""serve.py: serve a LuminaAI checkpoint over the OpenAI chat API, with a chat page in the browser.

Reads  FineTuned_Model.pth when present, else Model.pth, or the checkpoint path given.
Serves http://127.0.0.1:8000 by default:
  POST /v1/chat/completions   the OpenAI chat API, streamed (server-sent events) or not
  GET  /v1/models             the loaded checkpoint
  GET  /health                200 while it can serve; 503 while steps fail, after a crash, or shutting down
  GET  /                      a chat page (no key needed; it asks for one when the server wants it)
  POST /lumina/attention      what the model weighed when it wrote one character of a reply (see attention_answer)
  POST /lumina/pairs          with --pairs_file: append a preference pair chosen on the page (see parse_pair)

Only this machine's pages reach it: a request from another site's page (its Origin) is refused
unless --allowed_origins names that site, and on a loopback address the Host must be this machine's
(so a DNS-rebinding page cannot pose as it). POSTs must be application/json.

Every client shares one model. A scheduler thread runs it one step at a time over every sequence
in flight (continuous batching): a new request joins at the next step, and a finished, cancelled
or disconnected one leaves at once and frees its KV-cache slot. A token here is one character.

Run:
  python serve.py                                        # then open http://127.0.0.1:8000
  python serve.py path/to/Model.pth --port=8080 --api_key=secret
  python serve.py --pairs_file=my_pairs.jsonl            # the page's "compare" saves your choices there
  LUMINA_API_KEY=secret python serve.py                  # the key from the environment (not in `ps`)
  python serve.py --help                                 # every key, with its comment and default
Talk to it with any OpenAI client, e.g. in Python:
  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret").chat.completions.create(
      model="Model", messages=[{"role": "user", "content": "Hello!"}], stream=True)
The model id is the checkpoint's file name without .pth (GET /v1/models says it), or --model_name.
"""
import asyncio
import collections
import dataclasses
import heapq
import hmac
import json
import os
import sys
import threading
import time
import traceback
import uuid

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from lumina import data
from lumina.checkpoint import CheckpointError, default_checkpoint, load_for_chat
from lumina.config import CHAT_SAMPLING, parse_cli
from lumina.device import DTYPE_CHOICES, dtype_line, dtype_name
from lumina.engine import (LOGPROB_FLOOR, MAX_TOP_LOGPROBS, BeamSearch, Engine, Entry, Row, compile_buckets,
                           compile_choice, compile_line, generation_dtype, thread_choice, thread_line)
from lumina.evaluate import attention_view
from lumina.vocab import SPECIAL_TOKENS, TURN_ENDS, chat_prompt

CONFIG = {
    # --- network ---
    "host": "127.0.0.1",        # 127.0.0.1 serves this machine only; 0.0.0.0 every network it is on
    "port": 8000,               # TCP port
    "api_key": None,            # a secret: /v1/* then needs "Authorization: Bearer <key>"; None = $LUMINA_API_KEY, or open
    "allowed_origins": None,    # other sites whose pages may call the API, comma-separated (http://localhost:3000);
                                #   None = only the page this server serves
    "model_name": None,         # the model id clients see and send; None = the checkpoint's file name
    "pairs_file": None,         # a JSONL file the page's "compare" appends your choices to, in the pairs format of
                                #   Dataset_download.py (fine_tune.py --data=FILE learns them with DPO); None = no compare
    # --- batching ---
    "max_batch": 16,            # sequences generated together (KV-cache slots); more wait in the queue
    "max_queue": 64,            # requests waiting for a slot; past it the answer is 429
    # --- limits ---
    "max_tokens_limit": 10000,  # the largest max_tokens a request may ask for (characters)
    "max_body_bytes": 1000000,  # larger request bodies are refused with 413
    "max_messages": 1000,       # messages in one request; more are refused with 400
    "shutdown_seconds": 10.0,   # on Ctrl-C/SIGTERM, how long replies in flight may take to finish
    # --- default sampling (a request's own fields win) ---
    "temperature": CHAT_SAMPLING["temperature"],  # 0-2; 0 = greedy (ChatAI.py's default too)
    "top_k": CHAT_SAMPLING["top_k"],              # 1 or more; None = every character
    "top_p": 1.0,                                 # 0-1 nucleus mass; 1 = off (top-k alone, as ChatAI's topk mode)
    "repetition_penalty": CHAT_SAMPLING["repetition_penalty"],  # 1-2
    "max_tokens": CHAT_SAMPLING["max_new_chars"],  # reply length when a request does not say
    "length_penalty": 1.0,      # beam search (a request's num_beams > 1): log p / length**this; >0 favours longer
    # --- system ---
    "device": "auto",           # auto (cuda, then mps, then cpu), cpu, cuda, cuda:1 or mps
    "dtype": "auto",            # auto: bf16 on a GPU; on a CPU the faster of float32 and bf16 at 1 and max_batch
                                # rows, timed here once (cached); or float32, bfloat16, float16. Weights cast once
    "threads": 0,               # CPU threads for the model; 0 = auto: torch's default, but small batches on
                                # one thread where a timed trial says more threads do not pay
    "compile": "auto",          # compile the decode step, rows padded to powers of two (one graph each, all
                                # compiled at start): auto for the buckets where a trial here (once, cached) found
                                # compiled steps faster (few rows, typically; not many), true (all) or false
}
TYPES = {"api_key": str, "model_name": str, "allowed_origins": str, "pairs_file": str}
RULES = {"port": (1, 65535), "max_batch": (1, 1024), "max_queue": (0, 100000), "max_tokens_limit": (1, 10 ** 6),
         "max_body_bytes": (1000, 10 ** 9), "max_messages": (1, 10 ** 6), "shutdown_seconds": (0, 3600), "temperature": (0.0, 2.0),
         "top_k": (1, 10 ** 6), "top_p": (0.0, 1.0), "repetition_penalty": (1.0, 2.0), "max_tokens": (1, 10 ** 6),
         "threads": (0, 1024), "length_penalty": (-5.0, 5.0), "dtype": DTYPE_CHOICES,
         "compile": ("auto", "true", "false")}
SAMPLING = {"temperature": float, "top_k": int, "top_p": float, "repetition_penalty": float}  # per-request settings
MAX_STOPS = 4  # as OpenAI's API allows
MAX_STOP_CHARS = 256  # each stop string's length: matching costs nothing more, but a stop string is a few words
ATTENTION_ALTERNATIVES = 10  # the likeliest characters the attention view lists beside the one written
MAX_PAIR_CHARS = 100000  # characters of one pair (prompt and both replies): a pair from the page is a few hundred
FAILING_STEPS = 3  # consecutive failed steps after which /health answers 503 (a sticky CUDA error, say)
API_KEY_VARIABLE = "LUMINA_API_KEY"
LOOPBACK = ("localhost", "::1")  # with 127.0.0.0/8: the names a loopback-bound server answers to
SEND_EVERY = 0.025  # seconds: streamed text reaches the clients in batches at most this far apart


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
             413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
             503: "server_error"}

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self):
        body = {"error": {"message": self.message, "type": self.TYPES.get(self.status, "api_error"),
                          "param": self.param, "code": self.code}}
        headers = {"x-should-retry": "false"} if self.status == 429 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


# ----------------------------------------------------------------------------------------------
# A request: validated fields -> the prompt ids and each choice's sampling settings
# ----------------------------------------------------------------------------------------------
SUPPORTED = {"model", "messages", "temperature", "top_p", "top_k", "repetition_penalty", "max_tokens",
             "max_completion_tokens", "stop", "seed", "n", "stream", "stream_options", "user", "num_beams",
             "length_penalty", "logprobs", "top_logprobs"}
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "tools": None, "tool_choice": None,
           "response_format": None, "logit_bias": None, "parallel_tool_calls": None}
# Fields a client may send at their neutral value (the openai client and UIs often do); any other
# value, or any field not named here, is refused by name rather than silently ignored.


@dataclasses.dataclass
class ChatRequest:
    messages: list
    stream: bool
    include_usage: bool
    n: int
    num_beams: int  # 1: sample each of the n choices; more: beam search, whose n best beams are the choices
    length_penalty: float
    max_tokens: int
    stops: list
    seed: int
    sampling: dict  # temperature, top_k, top_p, repetition_penalty
    user: str       # the client's name for its end user (OpenAI's field): only logged with a failure
    top_logprobs: int = None  # None: no log-probs; k: each character's log-prob and its k likeliest alternatives


def field(body, name, kind, low=None, high=None, default=None):
    """body[name], checked: the right JSON type and, for numbers, inside [low, high]."""
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kinds):
        raise APIError(400, f"'{name}' must be {'a number' if kind is float else 'an integer' if kind is int else 'a ' + kind.__name__}, "
                            f"got {json.dumps(value)[:40]}", name)
    if low is not None and not low <= value <= high:
        raise APIError(400, f"'{name}' must be between {low} and {high}, got {value}", name)
    return value


def parse_messages(value, limit, name="messages"):
    """[{"role", "content"}] with content a string or a list of text parts, as the OpenAI API allows."""
    if not isinstance(value, list) or not value:
        raise APIError(400, f"'{name}' must be a non-empty list of {{role, content}} objects", name)
    if len(value) > limit:
        raise APIError(400, f"'{name}' holds {len(value):,} messages, more than this server's {limit:,} "
                            f"(--max_messages); send the recent turns only", name)
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise APIError(400, f"{name}[{i}].role must be system, user or assistant", f"{name}[{i}].role")
        content = message.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                             isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"{name}[{i}].content must be a string or a list of text parts", f"{name}[{i}].content")
        messages.append({"role": message["role"], "content": content})
    return messages


def parse_request(body, config, model_name):
    """A ChatRequest from a decoded JSON body, or an APIError that names the bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name, value in body.items():
        if name not in SUPPORTED and (name not in NEUTRAL or value not in (NEUTRAL[name], None, [], {})):
            raise APIError(400, f"'{name}' is not supported by this server" + (
                f" (only {json.dumps(NEUTRAL[name])})" if name in NEUTRAL else ""), name)
    if body.get("model") != model_name:
        raise APIError(404, f"the model {body.get('model')!r} does not exist; this server has {model_name!r}",
                       "model", "model_not_found")
    stops = body.get("stop")
    stops = [stops] if isinstance(stops, str) else stops or []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS
                                                                           for s in stops):
        raise APIError(400, f"'stop' must be a string or a list of up to {MAX_STOPS} strings of 1 to {MAX_STOP_CHARS} "
                            f"characters", "stop")
    options = field(body, "stream_options", dict, default={})
    limit = config["max_tokens_limit"]
    max_tokens = field(body, "max_completion_tokens", int, 1, limit, field(body, "max_tokens", int, 1, limit))
    n = field(body, "n", int, 1, config["max_batch"], 1)
    num_beams = field(body, "num_beams", int, 1, config["max_batch"], 1)
    if 1 < num_beams < n:
        raise APIError(400, f"'n' ({n}) cannot exceed 'num_beams' ({num_beams}): the choices are the best beams", "n")
    top_logprobs = field(body, "top_logprobs", int, 0, MAX_TOP_LOGPROBS)
    logprobs = field(body, "logprobs", bool, default=False)
    if top_logprobs is not None and not logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return ChatRequest(
        messages=parse_messages(body.get("messages"), config["max_messages"]), stream=field(body, "stream", bool, default=False),
        include_usage=bool(options.get("include_usage")), n=n, num_beams=num_beams,
        length_penalty=field(body, "length_penalty", float, *RULES["length_penalty"], config["length_penalty"]),
        max_tokens=max_tokens or config["max_tokens"], stops=stops, seed=field(body, "seed", int, -2 ** 63, 2 ** 63 - 1),
        sampling={key: field(body, key, kind, *RULES[key], config[key])  # the ranges of the server's own defaults
                  for key, kind in SAMPLING.items()}, user=field(body, "user", str),
        top_logprobs=(top_logprobs or 0) if logprobs else None)


def prompt_for(request, vocab, seq_length):
    """(prompt ids, characters dropped because the model never saw them): the chat stages' one
    prompt builder (vocab.chat_prompt), as ChatAI.py builds its prompts."""
    ids, _, unknown = chat_prompt(request.messages, vocab, seq_length)
    return ids, unknown


# ----------------------------------------------------------------------------------------------
# The lab: what the model weighed for one character, and preference pairs from the page
# ----------------------------------------------------------------------------------------------
def known_fields(body, names):
    """Refuse a body that is not an object, or that holds a field not in `names`, by name."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name in body:
        if name not in names:
            raise APIError(400, f"'{name}' is not a field of this endpoint (it takes {', '.join(names)})", name)


def attention_answer(body, net, vocab, config):
    """POST /lumina/attention {"messages": [..., the assistant's reply last], "position": i}: what the
    model read and weighed when it wrote character i of that reply, from one forward of the window it
    read then (lumina.evaluate.attention_view). Answers
      {"token": the character, "logprob", "top_logprobs": the likeliest characters there,
       "tokens": the window's characters (special tokens by name), "reply_start": where the reply
       begins among them (negative: before the window), "attention": [layer][head][position] weights
       of the query that wrote it over `tokens` (each head's sum to 1)}."""
    known_fields(body, ("messages", "position"))
    messages = parse_messages(body.get("messages"), config["max_messages"])
    reply = messages[-1]["content"]
    if messages[-1]["role"] != "assistant" or not reply:
        raise APIError(400, "the last message must be the assistant's reply whose character you look into", "messages")
    if body.get("position") is None:
        raise APIError(400, "'position' is required: which character of the reply (0 is the first)", "position")
    position = field(body, "position", int, 0, len(reply) - 1)
    unknown = vocab.unknown_chars(reply)
    if unknown:
        raise APIError(400, f"the reply holds characters the model never saw ({', '.join(map(repr, sorted(unknown)[:5]))}): "
                            f"it cannot have written them", "messages")
    prompt, _, _ = chat_prompt(messages[:-1], vocab, net.config.seq_length)
    ids = prompt + vocab.encode(reply)
    target = len(prompt) + position
    first, logprobs, weights = attention_view(net, ids, target)
    logprobs = logprobs.clamp(min=LOGPROB_FLOOR)  # JSON has no -Infinity
    top = logprobs.topk(min(ATTENTION_ALTERNATIVES, len(logprobs)))
    found = Entry(float(logprobs[ids[target]]), list(zip(top.indices.tolist(), top.values.tolist())))
    entry = json.loads(entry_json(token_table(vocab), ids[target], found))  # the entry a stream sends, as a dict
    return {"object": "lumina.attention", "position": position, **entry,
            "tokens": [vocab.itos[i] for i in ids[first:target]], "reply_start": len(prompt) - first,
            "attention": weights.tolist()}


def parse_pair(body, config):
    """A preference pair from POST /lumina/pairs {"prompt": [messages ending with the user's],
    "chosen", "rejected"}, checked as fine_tune.py's reader checks a pair (lumina.data.checked_pair),
    as the row Dataset_download.py writes (its own id and tree: one choice, one tree)."""
    known_fields(body, ("prompt", "chosen", "rejected"))
    try:
        data.check_text(body)  # a NUL or a lone surrogate would make a line the reader skips
    except ValueError as e:
        raise APIError(400, f"the pair {e}") from None
    prompt = parse_messages(body.get("prompt"), config["max_messages"], "prompt")
    replies = [field(body, name, str, default="") for name in ("chosen", "rejected")]
    size = sum(len(m["content"]) for m in prompt) + sum(map(len, replies))
    if size > MAX_PAIR_CHARS:
        raise APIError(413, f"the pair holds {size:,} characters, more than {MAX_PAIR_CHARS:,}: a pair is one "
                            f"exchange, not a document")
    try:
        pair = data.checked_pair({"prompt": prompt, "chosen": replies[0], "rejected": replies[1]})
    except ValueError as e:
        raise APIError(400, str(e)) from None
    if pair["chosen"] == pair["rejected"]:
        raise APIError(400, "'chosen' and 'rejected' are the same text: a pair needs two different replies", "rejected")
    pair_id = "page-" + uuid.uuid4().hex[:12]
    return {"id": pair_id, "tree": pair_id, **pair}


# ----------------------------------------------------------------------------------------------
# Stop strings: the reply never contains one, and streaming never sends half of one
# ----------------------------------------------------------------------------------------------
class StopText:
    """Text of one choice, released only when no stop string can still begin inside it. Each stop
    string is followed by a Knuth-Morris-Pratt automaton: one step per character whatever the
    strings' lengths, so no request can make the check (run under the scheduler's lock) slow."""

    def __init__(self, stops):
        self.stops = [(stop, fallbacks(stop)) for stop in stops]
        self.matched = [0] * len(stops)  # per stop string: how many of its first characters end the text
        self.text, self.sent = "", 0

    def add(self, chars):
        """(text that is safe to send now, True if a stop string was found)."""
        for char in chars:
            self.text += char
            hits = [len(stop) for i, (stop, table) in enumerate(self.stops) if self.advance(i, stop, table, char)]
            if hits:  # the first stop string to end; of two ending here, the longer began first
                self.text = self.text[:len(self.text) - max(hits)]
                return self.release(len(self.text)), True
        return self.release(len(self.text) - max(self.matched, default=0)), False

    def advance(self, i, stop, table, char):
        """Feed one character to stop string i's automaton; True when the whole string has matched."""
        k = self.matched[i]
        while k and stop[k] != char:
            k = table[k - 1]
        k += stop[k] == char
        self.matched[i] = table[k - 1] if k == len(stop) else k  # after a whole match, as after a mismatch
        return k == len(stop)

    def release(self, end):
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def flush(self):
        return self.release(len(self.text))


def fallbacks(pattern):
    """KMP's failure table: table[k] is the length of the longest proper prefix of pattern[:k + 1]
    that is also its suffix, where a match of k + 1 characters falls back to on a mismatch."""
    table, k = [0] * len(pattern), 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = table[k - 1]
        k += pattern[i] == pattern[k]
        table[i] = k
    return table


COMPACT = (",", ":")  # no spaces in the JSON sent: with log-probs a character's chunk is mostly punctuation


def token_table(vocab):
    """Per id, the JSON text around its log-prob in an entry, made once: ('{"token":"a","logprob":',
    ',"bytes":[97]'). An entry is then a few string joins: it is made for every character of every
    reply that asks (64 streams at once), and dicts turned into JSON cost 3 times as much."""
    return [('{"token":%s,"logprob":' % json.dumps(text),
             ',"bytes":%s' % json.dumps(list(text.encode("utf-8")), separators=COMPACT)) for text in vocab.itos]


def entry_json(tokens, token_id, entry):
    """One character's entry in OpenAI's shape, as JSON text: token, logprob, bytes (UTF-8) and
    top_logprobs, each alternative with its own token, logprob and bytes. A log-prob is a float32
    (the engine's), so 9 significant digits give it back exactly, in half the time of the float's
    repr and about 8 fewer characters (the engine's floor keeps -Infinity out)."""
    head, tail = tokens[token_id]
    top = ",".join([f"{tokens[i][0]}{logprob:.9g}{tokens[i][1]}}}" for i, logprob in entry.top])  # a list joins faster
    return f'{head}{entry.logprob:.9g}{tail},"top_logprobs":[{top}]}}'


# ----------------------------------------------------------------------------------------------
# The scheduler: one thread owns the engine and steps every sequence in flight together
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Job:
    """One request in flight: its KV-cache slots, its choices' rows (or its beam search), and where
    their events go (an asyncio queue)."""
    request: ChatRequest
    prompt_ids: list
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    slots: list = dataclasses.field(default_factory=list)     # the KV-cache slots it holds
    rows: list = dataclasses.field(default_factory=list)      # one engine Row per sampled choice
    beam: BeamSearch = None                                   # num_beams > 1: its best beams are the choices
    texts: list = dataclasses.field(default_factory=list)     # one StopText per choice
    entries: list = dataclasses.field(default_factory=list)   # per choice, with logprobs: (id, engine Entry) per character
    finished: list = dataclasses.field(default_factory=list)  # per choice: its last event was sent
    cancelled: bool = False
    failed: bool = False                                      # an error event was sent; nothing more will be

    @property
    def slots_needed(self):
        return max(self.request.n, self.request.num_beams)

    def start(self):
        """Set up the choices in the slots it was given: seeded rows (choice i uses seed + i), or a beam search."""
        request, slots = self.request, self.slots
        if request.num_beams > 1:
            self.beam = BeamSearch(self.prompt_ids, request.max_tokens, slots, request.length_penalty, TURN_ENDS,
                                   request.top_logprobs)
        else:
            self.rows = [Row(list(self.prompt_ids), request.max_tokens, slot, stop_ids=TURN_ENDS,
                             seed=None if request.seed is None else request.seed + i, top_logprobs=request.top_logprobs,
                             **request.sampling)
                         for i, slot in enumerate(slots)]
        self.texts = [StopText(request.stops) for _ in range(request.n)]
        self.entries = [[] for _ in range(request.n)]
        self.finished = [False] * request.n

    def live_rows(self):
        return [row for row in self.rows if not row.done]

    def live_searches(self):
        return [self.beam] if self.beam and not self.beam.done else []


def logged(error, what):
    """Write the error's traceback to the server's log under a short id, and return the id, which is
    all a client is told."""
    error_id = uuid.uuid4().hex[:8]
    print(f"error {error_id}: {what}", file=sys.stderr)
    traceback.print_exception(error, file=sys.stderr)
    return error_id


class Scheduler:
    """Iteration-level scheduling (Orca, vLLM): before every step, cancelled and finished jobs leave
    and waiting ones join while slots are free; then one engine step over every row in flight.

    A failure is contained: one job's failure (setting it up, or checking its stop strings) fails
    that job with a 500; a failed engine step fails the jobs of that step; either way the slots are
    freed and the next step goes on. If the thread dies anyway, `failure` says why, every waiting
    client gets a 503 at once, and so does every new request and /health."""

    def __init__(self, net, vocab, config, one_thread_rows=0):
        self.net, self.vocab, self.config = net, vocab, config
        self.tokens = token_table(vocab)  # each id's JSON, for log-prob entries
        self.dtype = next(net.parameters()).dtype  # serve.py casts the weights to the precision it chose
        # config["compile"]: the rows compile_choice chose; one_thread_rows: thread_choice's
        self.engine = Engine(net, config["max_batch"], compile=config["compile"], one_thread_rows=one_thread_rows)
        self.free = list(range(config["max_batch"]))  # a heap: the lowest slots first, so rows stay neighbours
        self.waiting, self.running = collections.deque(), []
        self.wake, self.accepting, self.outbox, self.failure = threading.Condition(), True, [], None
        self.urgent, self.sent_at, self.failed_steps, self.deadline = False, 0.0, [], None  # failed_steps: error ids of the failures in a row
        self.thread = threading.Thread(target=self.loop, daemon=True, name="scheduler")

    def check_room(self):
        """Raise the APIError a new request gets now (503, or 429 when the queue is full), before
        any work is spent on its prompt."""
        if self.failure:
            raise APIError(503, f"the server cannot generate: its scheduler stopped ({self.failure})")
        if not self.accepting:
            raise APIError(503, "the server is shutting down")
        if len(self.waiting) >= self.config["max_queue"] + len(self.free):  # free slots take them at the next step
            raise APIError(429, f"the queue is full ({self.config['max_queue']} requests wait); retry later")

    def submit(self, job):
        with self.wake:
            self.check_room()
            self.waiting.append(job)
            self.wake.notify()

    def health(self):
        """(HTTP status, body) of /health: 503 while it cannot serve (llama-server's rule)."""
        if self.failure:
            return 503, {"status": "failed", "reason": f"the scheduler stopped ({self.failure})"}
        if not self.accepting:
            return 503, {"status": "shutting down"}
        if len(self.failed_steps) >= FAILING_STEPS:
            return 503, {"status": "failing", "reason": f"the last {len(self.failed_steps)} steps failed (errors "
                                                        f"{', '.join(self.failed_steps[-FAILING_STEPS:])}: see the server's log)"}
        return 200, {"status": "ok", "dtype": dtype_name(self.dtype), "running": len(self.running),
                     "waiting": len(self.waiting), "free_slots": len(self.free)}

    def stop_accepting(self):
        """Shutting down: no new requests; those still waiting get 503, those running may finish
        within shutdown_seconds, after which the next step ends them with a 503 too."""
        with self.wake:
            self.accepting, self.deadline = False, time.monotonic() + self.config["shutdown_seconds"]
            while self.waiting:
                self.post(self.waiting.popleft(), "error", APIError(503, "the server is shutting down"))
            self.send()

    def cut_off(self):
        """Past the shutdown deadline: every reply still running ends with a 503 (its client learns
        why, and uvicorn's own graceful shutdown then has nothing left to wait for)."""
        for job in self.running:
            if not job.failed:
                self.post(job, "error", APIError(503, "the server shut down before this reply was finished"))
                job.failed = True

    def loop(self):
        try:
            while True:
                self.step()
        except BaseException as e:  # the thread is ending: say why, and leave no client waiting
            self.die(e)

    def step(self):
        """Let jobs leave and join, then advance every row in flight by one id."""
        with self.wake:
            if not self.accepting and time.monotonic() > self.deadline:
                self.cut_off()
            self.running = [job for job in self.running if not self.retire(job)]
            self.send()
            self.admit()
            if not self.running:
                self.wake.wait()
                return
        live, failure = [job for job in self.running if not job.failed], None
        try:
            self.engine.step([row for job in live for row in job.live_rows()],
                             [search for job in live for search in job.live_searches()])
        except Exception as e:  # the batched step failed: every job in it fails, the server goes on
            failure = logged(e, "a batched step failed")
        with self.wake:  # the event loop's thread posts too (stop_accepting): one writer of the outbox at a time
            self.failed_steps = self.failed_steps + [failure] if failure else []
            for job in live:
                if failure:
                    self.fail(job, failure)
                else:
                    self.guarded(job, self.deliver, job)
            self.send()

    def admit(self):
        """Waiting jobs join, first come first served, while their rows or beams fit in free slots."""
        while self.waiting and (self.waiting[0].cancelled or self.waiting[0].slots_needed <= len(self.free)):
            job = self.waiting.popleft()
            if not job.cancelled:
                self.running.append(job)
                job.slots = [heapq.heappop(self.free) for _ in range(job.slots_needed)]  # retire() frees them, whatever start does
                self.guarded(job, job.start)

    def guarded(self, job, work, *args):
        """work(*args) for one job; an exception fails that job alone."""
        try:
            work(*args)
        except Exception as e:
            who = f" (user {job.request.user!r})" if job.request.user else ""
            self.fail(job, logged(e, f"a request failed{who}"))

    def fail(self, job, error_id):
        """Answer the job with a 500 that names the logged error by its id (the exception's text stays
        in the server's log: it can hold paths or other clients' text); retire() frees its slots."""
        self.post(job, "error", APIError(500, f"generation failed (error {error_id}: the server's log has the details)"))
        job.failed = True

    def die(self, error):
        error_id = logged(error, "the scheduler stopped")
        with self.wake:
            self.failure, self.accepting = f"error {error_id}: see the server's log", False
            for job in [*self.waiting, *self.running]:
                self.post(job, "error", APIError(503, f"the server cannot generate: its scheduler stopped ({self.failure})"))
            self.waiting.clear()
            self.send()

    def post(self, job, *event):
        """Queue an event for the job's client. A reply's first text and every ending go out at the
        next send(); the rest may wait up to SEND_EVERY."""
        first = event[0] == "delta" and job.texts[event[1]].sent == len(event[2])
        self.urgent = self.urgent or event[0] != "delta" or event[3] is not None or first
        self.outbox.append((job, event))

    def send(self):
        """Hand the waiting events to the event loop in one wake-up, at most every SEND_EVERY
        seconds unless one is urgent: waking it once per row, or even once per step, costs the
        HTTP side more than the step itself, and a reader sees no difference."""
        now = time.monotonic()
        if self.outbox and (self.urgent or now - self.sent_at >= SEND_EVERY):
            batch, self.outbox, self.urgent, self.sent_at = self.outbox, [], False, now
            batch[0][0].loop.call_soon_threadsafe(lambda: [job.events.put_nowait(event) for job, event in batch])

    def deliver(self, job):
        """Send each choice's new text; a choice ends at a stop id, a stop string or max_tokens. A
        beam search's choices come whole when it ends: until then any beam may still be overtaken."""
        if job.beam:
            if job.beam.done and not all(job.finished):
                n = job.request.n
                for i, (_, ids, entries) in enumerate((job.beam.finished + [(0.0, [], None)] * n)[:n]):
                    self.emit(job, i, ids, ended=True, entries=entries)
            return
        for i, row in enumerate(job.rows):
            if not job.finished[i] and self.emit(job, i, row.ids[-1:], row.done, row.entries and row.entries[-1:]):
                row.max_new_tokens = row.new  # a stop string ends the row too

    def emit(self, job, i, ids, ended, entries=None):
        """Post choice i's text for its new `ids` (and their engine Entries, with logprobs); the
        choice ends when `ended` or at a stop string. Returns whether it ended."""
        text, sent = job.texts[i], job.texts[i].sent
        shown = [b for b, t in enumerate(ids) if t >= len(SPECIAL_TOKENS)]  # special ids are not text
        if entries:
            job.entries[i] += [(ids[b], entries[b]) for b in shown]
        out, hit = text.add("".join(self.vocab.itos[ids[b]] for b in shown))
        if hit or ended:
            job.finished[i] = True
            reason = "stop" if hit or (ids and ids[-1] in TURN_ENDS) else "length"
            out = out if hit else out + text.flush()
            self.post(job, "delta", i, out, reason, self.logprobs(job, i, sent, out))
        elif out:
            self.post(job, "delta", i, out, None, self.logprobs(job, i, sent, out))
        return hit or ended

    def logprobs(self, job, i, sent, out):
        """OpenAI's logprobs content of the text `out` that choice i releases from position `sent`:
        the same characters, so the entries of a reply always spell its text (a stop string's
        characters are never sent, nor their entries). None without logprobs."""
        if job.request.top_logprobs is None:
            return None
        return [entry_json(self.tokens, token_id, entry) for token_id, entry in job.entries[i][sent:sent + len(out)]]

    def retire(self, job):
        """True when the job can leave: cancelled, failed, or every choice finished. Frees its slots."""
        if not (job.cancelled or job.failed or all(job.finished)):
            return False
        for slot in job.slots:
            heapq.heappush(self.free, slot)
        if not (job.cancelled or job.failed):
            completion = sum(len(t.text) for t in job.texts)
            self.post(job, "done", {"prompt_tokens": len(job.prompt_ids), "completion_tokens": completion,
                                    "total_tokens": len(job.prompt_ids) + completion})
        return True

    def cancel(self, job):
        with self.wake:
            job.cancelled = True
            if job in self.waiting:  # it never started: its place in the queue is free at once
                self.waiting.remove(job)
            self.wake.notify()


# ----------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------
def completion_json(fields, choices):
    """A completion (or a chunk of one) as JSON text: its `fields`, then "choices", given as JSON
    text (choice_json), so that log-prob entries go in as the scheduler wrote them."""
    return f'{json.dumps(fields, separators=COMPACT)[:-1]},"choices":[{",".join(choices)}]}}'


def choice_json(index, key, value, entries, reason):
    """One choice as JSON text: its `key` ("delta" streamed, "message" whole), its "logprobs" (null
    without them, else {"content": [entry JSON per character]}) and its finish_reason."""
    logprobs = "null" if entries is None else f'{{"content":[{",".join(entries)}],"refusal":null}}'
    return (f'{{"index":{index},"{key}":{json.dumps(value, separators=COMPACT)},"logprobs":{logprobs},'
            f'"finish_reason":{json.dumps(reason)}}}')


def chunk(stream, choices, **extra):
    """One server-sent event: a chat.completion.chunk. `stream` is (id, created, model name)."""
    completion_id, created, model_name = stream
    return "data: " + completion_json({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                       "model": model_name, **extra}, choices) + "\n\n"


def events_to_sse(events, stream, include_usage):
    """The scheduler's events as server-sent events. Consecutive text of one choice (and its
    log-probs) is merged into one chunk, so a stream that fell behind catches up in fewer, larger chunks."""
    out, texts, entries = [], {}, {}
    for event in events + [("end",)]:
        if event[0] == "delta" and event[3] is None:
            texts[event[1]] = texts.get(event[1], "") + event[2]
            if event[4] is not None:
                entries[event[1]] = entries.get(event[1], []) + event[4]
            continue
        out += [chunk(stream, [choice_json(i, "delta", {"content": t}, entries.get(i), None)], usage=None)
                for i, t in texts.items()]
        texts, entries = {}, {}
        if event[0] == "delta":  # a choice's last text, with its finish_reason
            out.append(chunk(stream, [choice_json(event[1], "delta", {"content": event[2]} if event[2] else {}, event[4],
                                                  event[3])], usage=None))
        elif event[0] == "error":  # the error, then the end of the stream, so a client stops waiting
            out.append("data: " + json.dumps({"error": {"message": event[1].message, "type": "server_error"}}) + "\n\n")
            out.append("data: [DONE]\n\n")
        elif event[0] == "done":
            out += [chunk(stream, [], usage=event[1])] if include_usage else []
            out.append("data: [DONE]\n\n")
    return "".join(out)


async def stream_events(job, scheduler, completion_id, model_name, dropped):
    """Server-sent events: the role first, then text as it comes, finish_reason in each choice's
    last chunk, the usage chunk when asked for, then data: [DONE]."""
    stream = (completion_id, int(time.time()), model_name)
    try:
        yield chunk(stream, [choice_json(i, "delta", {"role": "assistant", "content": ""}, None, None)
                             for i in range(job.request.n)], usage=None, dropped_characters=dropped)
        while True:
            events = [await job.events.get()]
            while not job.events.empty():  # everything that waits goes out in one write
                events.append(job.events.get_nowait())
            yield events_to_sse(events, stream, job.request.include_usage)
            if events[-1][0] in ("error", "done"):
                return
    finally:
        scheduler.cancel(job)  # a client that went away frees its slots at the next step


async def collect(job, scheduler, request):
    """A whole reply: every choice's text and finish_reason, and the usage. A client that
    disconnects while waiting cancels its job."""
    n = job.request.n
    texts, reasons = [""] * n, [None] * n
    entries = [None if job.request.top_logprobs is None else [] for _ in range(n)]
    try:
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None
                continue
            if event[0] == "error":
                raise event[1]
            if event[0] == "done":
                return texts, reasons, entries, event[1]
            _, index, text, reason, found = event
            texts[index] += text
            reasons[index] = reason or reasons[index]
            if found is not None:
                entries[index] += found
    finally:
        scheduler.cancel(job)


def build_app(scheduler, config, model_name):
    app = FastAPI(title="LuminaAI", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request, e):
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        message = "no such path; see /v1/chat/completions" if e.status_code == 404 else str(e.detail)
        return APIError(e.status_code, message).response()

    @app.get("/health")
    async def health():
        status, body = scheduler.health()
        return JSONResponse({**body, "model": model_name}, status_code=status)

    created = int(os.path.getmtime(config["checkpoint"]))  # read once: the file may move while the model serves

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request, config)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "luminaai"}]}

    page_html = chat_page(config, model_name)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return page_html

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request, config)
        return await complete(request, scheduler, config, model_name)

    add_lab(app, scheduler, config)
    origins = allowed_origins(config)
    app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                       allow_headers=["Authorization", "Content-Type"])
    return SameSite(app, config["host"], origins)


def add_lab(app, scheduler, config):
    """The lab's endpoints: what the model weighed for one character, and pairs saved from the page."""
    @app.post("/lumina/attention")
    async def attention(request: Request):
        authorize(request, config)
        body = await read_body(request, config["max_body_bytes"])
        # One forward of a window, off the event loop, beside the scheduler's steps (both only read the weights);
        # answered as JSON at once: FastAPI's encoder would walk the thousands of weights one by one.
        return JSONResponse(await asyncio.to_thread(attention_answer, body, scheduler.net, scheduler.vocab, config))

    appending = threading.Lock()  # one pair written at a time: each append rewrites the file

    @app.post("/lumina/pairs")
    async def pairs(request: Request):
        authorize(request, config)
        if not config["pairs_file"]:
            raise APIError(404, "this server keeps no preference pairs: start it with --pairs_file=PATH")
        pair = parse_pair(await read_body(request, config["max_body_bytes"]), config)

        def append():
            with appending:
                return data.append_jsonl(config["pairs_file"], pair)
        try:
            lines = await asyncio.to_thread(append)
        except OSError as e:  # a full disk or a folder it may not write: the file is as it was
            raise APIError(500, f"could not save the pair to {config['pairs_file']} ({e.strerror or e}); "
                                f"the file is unchanged") from None
        return {"object": "lumina.pair", "id": pair["id"], "file": config["pairs_file"], "pairs": lines}


PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_page.html")  # the chat page, beside this file
PAGE_DEFAULTS = ("temperature", "top_p", "top_k", "max_tokens")  # the page's controls start at the server's values


def chat_page(config, model_name):
    with open(PAGE, encoding="utf-8") as f:
        html = f.read()
    defaults = {**{key: config[key] for key in PAGE_DEFAULTS}, "pairs": bool(config["pairs_file"])}
    return html.replace("__MODEL__", json.dumps(model_name)).replace("__DEFAULTS__", json.dumps(defaults))


def allowed_origins(config):
    return [origin.strip().rstrip("/") for origin in (config["allowed_origins"] or "").split(",") if origin.strip()]


class SameSite:
    """Refuses, before the app sees it, a request that a web page of another site could have sent
    (Jupyter Server's and Ollama's checks): an Origin that is neither this server nor an allowed one
    (any page can POST to 127.0.0.1), a Host that is not this machine's name while bound to loopback
    (DNS rebinding: evil.example resolving to 127.0.0.1), and a POST whose body is not declared
    JSON (a cross-site form or text/plain POST needs no preflight)."""

    def __init__(self, app, host, origins):
        self.app, self.loopback, self.origins = app, is_loopback(host), set(origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            error = self.refusal(Headers(scope=scope), scope["method"])
            if error:
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)

    def refusal(self, headers, method):
        host, origin = headers.get("host", ""), headers.get("origin")
        if self.loopback and not is_loopback(host_name(host)):
            return APIError(403, f"Host {host!r} is not this machine: a loopback server answers only to localhost or "
                                 f"127.0.0.1 (a page on another name may be a DNS-rebinding attack)")
        if origin and origin != f"http://{host}" and origin not in self.origins:
            return APIError(403, f"requests from pages of {origin} are refused; start the server with "
                                 f"--allowed_origins={origin} to allow that site")
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if method == "POST" and media != "application/json":
            return APIError(415, f"POST bodies must be sent as application/json, got {media or 'no Content-Type'!r}")
        return None


def host_name(host):
    """The name part of a Host header: example:80 -> example, [::1]:80 -> ::1."""
    if host.startswith("["):
        return host[1:].split("]")[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(name):
    return name in LOOPBACK or name.split(".")[0] == "127"


def authorize(request, config):
    """With an API key set, /v1/* needs "Authorization: Bearer <key>"; the page and /health do not.
    Compared in constant time, so the answer's timing tells nothing of the key."""
    given = request.headers.get("authorization", "").encode()
    if config["api_key"] and not hmac.compare_digest(given, f"Bearer {config['api_key']}".encode()):
        raise APIError(401, "a valid API key is needed: send 'Authorization: Bearer <key>'", code="invalid_api_key")


async def read_body(request, limit):
    """The JSON body; 413 past `limit` bytes, told by Content-Length or found while reading."""
    if int(request.headers.get("content-length") or 0) > limit:
        raise APIError(413, f"the request body is over {limit:,} bytes")
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"the request body is over {limit:,} bytes")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise APIError(400, "the request body is JSON nested too deeply") from None


async def complete(request, scheduler, config, model_name):
    chat = parse_request(await read_body(request, config["max_body_bytes"]), config, model_name)
    scheduler.check_room()  # a full queue answers 429 before any work on the prompt
    # Building the prompt is linear in the request, but off the event loop all the same: a large one
    # never holds up /health or the streams of others.
    prompt, dropped = await asyncio.to_thread(prompt_for, chat, scheduler.vocab, scheduler.net.config.seq_length)
    job = Job(chat, prompt, asyncio.get_running_loop(), asyncio.Queue())
    scheduler.submit(job)
    completion_id = "chatcmpl-" + uuid.uuid4().hex
    if chat.stream:
        return StreamingResponse(stream_events(job, scheduler, completion_id, model_name, dropped),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    result = await collect(job, scheduler, request)
    if result is None:
        return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
    texts, reasons, entries, usage = result
    fields = {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
              "usage": usage, "dropped_characters": dropped}
    choices = [choice_json(i, "message", {"role": "assistant", "content": text}, found, reason)
               for i, (text, reason, found) in enumerate(zip(texts, reasons, entries))]
    return Response(completion_json(fields, choices), media_type="application/json")


class Server(uvicorn.Server):
    """uvicorn, with a shutdown that stops the scheduler taking requests and then exits 0."""

    def __init__(self, uvicorn_config, scheduler):
        super().__init__(uvicorn_config)
        self.scheduler = scheduler

    def handle_exit(self, sig, frame):
        if not self.scheduler.accepting:  # a second signal: stop now
            hard_exit("stopped at a second signal")
        self.scheduler.stop_accepting()
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # a clean shutdown is not a crash: exit 0, do not re-raise
        # The scheduler ends the replies still running at shutdown_seconds, and uvicorn's graceful
        # shutdown follows; should a stuck step or handler block the event loop, the process still
        # ends on time: shutdown_seconds, then two margins more.
        grace = self.config.timeout_graceful_shutdown + SHUTDOWN_MARGIN
        watchdog = threading.Timer(grace, hard_exit, [f"stopped: replies still running after {grace:g} s were cut off"])
        watchdog.daemon = True  # a shutdown that finishes in time ends the process without waiting for it
        watchdog.start()


SHUTDOWN_MARGIN = 1.0  # seconds past shutdown_seconds before the process ends, whatever is in flight


def hard_exit(message):
    print(message, flush=True)
    os._exit(0)


# ----------------------------------------------------------------------------------------------
def main(argv):
    config, _, paths = parse_cli(argv, CONFIG, __file__, types=TYPES, rules=RULES, positional=1)
    config["checkpoint"] = default_checkpoint(paths[0] if paths else None)
    config["api_key"] = config["api_key"] or os.environ.get(API_KEY_VARIABLE) or None
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    # --- model and scheduler ---
    try:
        net, vocab, _ = load_for_chat(config["checkpoint"], config["device"])
    except (ValueError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    model_name = config["model_name"] or os.path.splitext(os.path.basename(config["checkpoint"]))[0]
    dtype, why = generation_dtype(net, config["dtype"], (1, config["max_batch"]))
    net = net.to(dtype)
    if config["compile"] != "false":
        print({"true": "compiling the decode step for every bucket of rows (a one-off wait)...",
               "auto": "compile auto: timing compiled against eager decode steps unless this machine did before, then "
                       "compiling the buckets where it paid (a one-off wait)..."}[config["compile"]], flush=True)
    threads = torch.get_num_threads()
    one_thread_rows, threads_why = thread_choice(net, config["threads"], config["max_batch"])
    rows, compiled = compile_choice(net, config["compile"], config["max_batch"], one_thread_rows=one_thread_rows)
    scheduler = Scheduler(net, vocab, {**config, "compile": rows}, one_thread_rows)
    compile_buckets(scheduler.engine)
    scheduler.thread.start()
    # --- serve until Ctrl-C or SIGTERM ---
    print(f"LuminaAI | {config['checkpoint']} as {model_name!r} | {net.num_params():,} parameters | "
          f"context {net.config.seq_length} | batch {config['max_batch']} | queue {config['max_queue']} | "
          f"http://{config['host']}:{config['port']}" + (" | API key required" if config["api_key"] else ""), flush=True)
    print(dtype_line(dtype, config["dtype"], why), flush=True)
    print(thread_line(one_thread_rows, config["max_batch"], threads, config["threads"], threads_why), flush=True)
    print(compile_line(rows, config["max_batch"], config["compile"], compiled), flush=True)
    app = build_app(scheduler, config, model_name)
    server = Server(uvicorn.Config(app, host=config["host"], port=config["port"], log_level="warning",
                                   timeout_graceful_shutdown=config["shutdown_seconds"] + SHUTDOWN_MARGIN), scheduler)
    try:
        server.run()
    except OSError as e:  # the port is taken, or the host is not this machine's
        sys.exit(f"error: cannot listen on {config['host']}:{config['port']} ({e.strerror or e}); choose another --port")
    print("stopped", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
