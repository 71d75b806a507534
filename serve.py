"""serve.py: serve a LuminaAI checkpoint over the OpenAI chat API, with a chat page in the browser.

Reads  FineTuned_Model.pth when present, else Model.pth, or the checkpoint path given.
Serves http://127.0.0.1:8000 by default:
  POST /v1/chat/completions   the OpenAI chat API, streamed (server-sent events) or not
  GET  /v1/models             the loaded checkpoint
  GET  /health                answers while the model is loaded (no key needed)
  GET  /                      a chat page (no key needed; it asks for one when the server wants it)

Every client shares one model. A scheduler thread runs it one step at a time over every sequence
in flight (continuous batching): a new request joins at the next step, and a finished, cancelled
or disconnected one leaves at once and frees its KV-cache slot. A token here is one character.

Run:
  python serve.py                                        # then open http://127.0.0.1:8000
  python serve.py path/to/Model.pth --port=8080 --api_key=secret
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
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lumina.checkpoint import CheckpointError, default_checkpoint, load_for_chat
from lumina.config import parse_cli
from lumina.device import DTYPE_CHOICES, dtype_line
from lumina.engine import BeamSearch, Engine, Row, compile_buckets, generation_dtype
from lumina.vocab import SPECIAL_TOKENS, TURN_ENDS, render_chat, turns_to_drop, unknown_chars_dropped

CONFIG = {
    # --- network ---
    "host": "127.0.0.1",        # 127.0.0.1 serves this machine only; 0.0.0.0 every network it is on
    "port": 8000,               # TCP port
    "api_key": None,            # a secret: /v1/* then needs "Authorization: Bearer <key>"; None = open
    "model_name": None,         # the model id clients see and send; None = the checkpoint's file name
    # --- batching ---
    "max_batch": 16,            # sequences generated together (KV-cache slots); more wait in the queue
    "max_queue": 64,            # requests waiting for a slot; past it the answer is 429
    # --- limits ---
    "max_tokens_limit": 10000,  # the largest max_tokens a request may ask for (characters)
    "max_body_bytes": 1000000,  # larger request bodies are refused with 413
    "shutdown_seconds": 10.0,   # on Ctrl-C/SIGTERM, how long replies in flight may take to finish
    # --- default sampling (a request's own fields win) ---
    "temperature": 0.8,         # 0-2; 0 = greedy
    "top_k": 40,                # 1 or more; None = every character
    "top_p": 1.0,               # 0-1 nucleus mass; 1 = off
    "repetition_penalty": 1.0,  # 1-2
    "max_tokens": 400,          # reply length when a request does not say
    "length_penalty": 1.0,      # beam search (a request's num_beams > 1): log p / length**this; >0 favours longer
    # --- system ---
    "device": "auto",           # auto (cuda, then mps, then cpu), cpu, cuda, cuda:1 or mps
    "dtype": "auto",            # auto: bf16 on a GPU; on a CPU the faster of float32 and bf16 at 1 and max_batch
                                # rows, timed here once (cached); or float32, bfloat16, float16. Weights cast once
    "threads": 0,               # CPU threads for the model; 0 = torch's default
    "compile": False,           # compile the decode step, rows padded to powers of two (one graph each, all
                                # compiled at start); pays for few rows at once, not for many (benchmarks/README.md)
}
TYPES = {"api_key": str, "model_name": str}
RULES = {"port": (1, 65535), "max_batch": (1, 1024), "max_queue": (0, 100000), "max_tokens_limit": (1, 10 ** 6),
         "max_body_bytes": (1000, 10 ** 9), "shutdown_seconds": (0, 3600), "temperature": (0.0, 2.0),
         "top_k": (1, 10 ** 6), "top_p": (0.0, 1.0), "repetition_penalty": (1.0, 2.0), "max_tokens": (1, 10 ** 6),
         "threads": (0, 1024), "length_penalty": (-5.0, 5.0), "dtype": DTYPE_CHOICES}
SAMPLING = {"temperature": float, "top_k": int, "top_p": float, "repetition_penalty": float}  # per-request settings
MAX_STOPS = 4  # as OpenAI's API allows
SEND_EVERY = 0.025  # seconds: streamed text reaches the clients in batches at most this far apart


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

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
             "length_penalty"}
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "tools": None, "tool_choice": None,
           "response_format": None, "logit_bias": None, "parallel_tool_calls": None, "top_logprobs": None}
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


def parse_messages(value):
    """[{"role", "content"}] with content a string or a list of text parts, as the OpenAI API allows."""
    if not isinstance(value, list) or not value:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role must be system, user or assistant", f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                             isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")
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
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, f"'stop' must be a string or a list of up to {MAX_STOPS} non-empty strings", "stop")
    options = field(body, "stream_options", dict, default={})
    limit = config["max_tokens_limit"]
    max_tokens = field(body, "max_completion_tokens", int, 1, limit, field(body, "max_tokens", int, 1, limit))
    n = field(body, "n", int, 1, config["max_batch"], 1)
    num_beams = field(body, "num_beams", int, 1, config["max_batch"], 1)
    if 1 < num_beams < n:
        raise APIError(400, f"'n' ({n}) cannot exceed 'num_beams' ({num_beams}): the choices are the best beams", "n")
    return ChatRequest(
        messages=parse_messages(body.get("messages")), stream=field(body, "stream", bool, default=False),
        include_usage=bool(options.get("include_usage")), n=n, num_beams=num_beams,
        length_penalty=field(body, "length_penalty", float, *RULES["length_penalty"], config["length_penalty"]),
        max_tokens=max_tokens or config["max_tokens"], stops=stops, seed=field(body, "seed", int, -2 ** 63, 2 ** 63 - 1),
        sampling={key: field(body, key, kind, *RULES[key], config[key])  # the ranges of the server's own defaults
                  for key, kind in SAMPLING.items()}, user=field(body, "user", str))


def prompt_for(request, vocab, seq_length):
    """(prompt ids, characters dropped because the model never saw them). Leading system messages
    stay; when the history outgrows the window the oldest turns after them go whole, as in ChatAI."""
    messages, dropped = [], 0
    for message in request.messages:
        text, _ = unknown_chars_dropped(message["content"], vocab)
        dropped += len(message["content"]) - len(text)
        messages.append({**message, "content": text})
    pinned = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    cut = turns_to_drop(messages, vocab, seq_length, pinned)
    ids, _ = render_chat(messages[:pinned] + messages[pinned + cut:], vocab, add_generation_prompt=True)
    return ids, dropped


# ----------------------------------------------------------------------------------------------
# Stop strings: the reply never contains one, and streaming never sends half of one
# ----------------------------------------------------------------------------------------------
class StopText:
    """Text of one choice, released only when no stop string can still begin inside it."""

    def __init__(self, stops):
        self.stops, self.text, self.sent = stops, "", 0

    def add(self, chars):
        """(text that is safe to send now, True if a stop string was found)."""
        self.text += chars
        hits = [self.text.find(s, max(0, self.sent - len(s))) for s in self.stops]
        hits = [h for h in hits if h >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self.release(len(self.text)), True
        held = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self.release(len(self.text) - held), False

    def release(self, end):
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def flush(self):
        return self.release(len(self.text))


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
    finished: list = dataclasses.field(default_factory=list)  # per choice: its last event was sent
    cancelled: bool = False
    failed: bool = False                                      # an error event was sent; nothing more will be

    @property
    def slots_needed(self):
        return max(self.request.n, self.request.num_beams)

    def start(self, slots):
        """Take the slots and set up the choices: seeded rows (choice i uses seed + i), or a beam search."""
        request = self.request
        self.slots = slots
        if request.num_beams > 1:
            self.beam = BeamSearch(self.prompt_ids, request.max_tokens, slots, request.length_penalty, TURN_ENDS)
        else:
            self.rows = [Row(list(self.prompt_ids), request.max_tokens, slot, stop_ids=TURN_ENDS,
                             seed=None if request.seed is None else request.seed + i, **request.sampling)
                         for i, slot in enumerate(slots)]
        self.texts = [StopText(request.stops) for _ in range(request.n)]
        self.finished = [False] * request.n

    def live_rows(self):
        return [row for row in self.rows if not row.done]

    def live_searches(self):
        return [self.beam] if self.beam and not self.beam.done else []


class Scheduler:
    """Iteration-level scheduling (Orca, vLLM): before every step, cancelled and finished jobs leave
    and waiting ones join while slots are free; then one engine step over every row in flight.

    A failure is contained: one job's failure (setting it up, or checking its stop strings) fails
    that job with a 500; a failed engine step fails the jobs of that step; either way the slots are
    freed and the next step goes on. If the thread dies anyway, `failure` says why, every waiting
    client gets a 503 at once, and so does every new request and /health."""

    def __init__(self, net, vocab, config):
        self.net, self.vocab, self.config = net, vocab, config
        self.dtype = next(net.parameters()).dtype  # serve.py casts the weights to the precision it chose
        self.engine = Engine(net, config["max_batch"], compile=config["compile"])
        self.free = list(range(config["max_batch"]))  # a heap: the lowest slots first, so rows stay neighbours
        self.waiting, self.running = collections.deque(), []
        self.wake, self.accepting, self.outbox, self.failure = threading.Condition(), True, [], None
        self.urgent, self.sent_at = False, 0.0
        self.thread = threading.Thread(target=self.loop, daemon=True, name="scheduler")

    def submit(self, job):
        with self.wake:
            if self.failure:
                raise APIError(503, f"the server cannot generate: its scheduler stopped ({self.failure})")
            if not self.accepting:
                raise APIError(503, "the server is shutting down")
            if len(self.waiting) >= self.config["max_queue"] + len(self.free):  # free slots take them at the next step
                raise APIError(429, f"the queue is full ({self.config['max_queue']} requests wait); retry later")
            self.waiting.append(job)
            self.wake.notify()

    def stop_accepting(self):
        """Shutting down: no new requests; those still waiting get 503, those running finish."""
        with self.wake:
            self.accepting = False
            while self.waiting:
                self.post(self.waiting.popleft(), "error", APIError(503, "the server is shutting down"))
            self.send()

    def loop(self):
        try:
            while True:
                self.step()
        except BaseException as e:  # the thread is ending: say why, and leave no client waiting
            self.die(e)

    def step(self):
        """Let jobs leave and join, then advance every row in flight by one id."""
        with self.wake:
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
            failure = e
        with self.wake:  # the event loop's thread posts too (stop_accepting): one writer of the outbox at a time
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
                self.guarded(job, job.start, [heapq.heappop(self.free) for _ in range(job.slots_needed)])

    def guarded(self, job, work, *args):
        """work(*args) for one job; an exception fails that job alone."""
        try:
            work(*args)
        except Exception as e:
            self.fail(job, e)

    def fail(self, job, error):
        """Answer the job with a 500 that names the error; retire() frees its slots."""
        traceback.print_exception(error, file=sys.stderr)
        who = f" (user {job.request.user!r})" if job.request.user else ""
        self.post(job, "error", APIError(500, f"generation failed{who}: {type(error).__name__}: {error}"))
        job.failed = True

    def die(self, error):
        traceback.print_exception(error, file=sys.stderr)
        with self.wake:
            self.failure, self.accepting = f"{type(error).__name__}: {error}", False
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
                for i, (_, ids) in enumerate((job.beam.finished + [(0.0, [])] * n)[:n]):
                    self.emit(job, i, ids, ended=True)
            return
        for i, row in enumerate(job.rows):
            if not job.finished[i] and self.emit(job, i, row.ids[-1:], row.done):
                row.max_new_tokens = row.new  # a stop string ends the row too

    def emit(self, job, i, ids, ended):
        """Post choice i's text for its new `ids`; the choice ends when `ended` or at a stop string.
        Returns whether it ended."""
        text = job.texts[i]
        out, hit = text.add("".join(self.vocab.itos[t] for t in ids if t >= len(SPECIAL_TOKENS)))
        if hit or ended:
            job.finished[i] = True
            reason = "stop" if hit or (ids and ids[-1] in TURN_ENDS) else "length"
            self.post(job, "delta", i, out if hit else out + text.flush(), reason)
        elif out:
            self.post(job, "delta", i, out, None)
        return hit or ended

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
def chunk(stream, choices, **extra):
    """One server-sent event: a chat.completion.chunk. `stream` is (id, created, model name)."""
    completion_id, created, model_name = stream
    return "data: " + json.dumps({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                  "model": model_name, "choices": choices, **extra}) + "\n\n"


def events_to_sse(events, stream, include_usage):
    """The scheduler's events as server-sent events. Consecutive text of one choice is merged into
    one chunk, so a stream that fell behind catches up in fewer, larger chunks."""
    out, texts = [], {}
    for event in events + [("end",)]:
        if event[0] == "delta" and event[3] is None:
            texts[event[1]] = texts.get(event[1], "") + event[2]
            continue
        out += [chunk(stream, [{"index": i, "delta": {"content": t}, "finish_reason": None}], usage=None)
                for i, t in texts.items()]
        texts = {}
        if event[0] == "delta":  # a choice's last text, with its finish_reason
            out.append(chunk(stream, [{"index": event[1], "delta": {"content": event[2]} if event[2] else {},
                                       "finish_reason": event[3]}], usage=None))
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
        yield chunk(stream, [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
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
    texts, reasons = [""] * job.request.n, [None] * job.request.n
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
                return texts, reasons, event[1]
            _, index, text, reason = event
            texts[index] += text
            reasons[index] = reason or reasons[index]
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
        if scheduler.failure:
            return JSONResponse({"status": "failed", "reason": scheduler.failure}, status_code=503)
        return {"status": "ok", "model": model_name, "dtype": str(scheduler.dtype).replace("torch.", ""),
                "running": len(scheduler.running), "waiting": len(scheduler.waiting)}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request, config)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(os.path.getmtime(config["checkpoint"])),
                                            "owned_by": "luminaai"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.replace("__MODEL__", json.dumps(model_name))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request, config)
        return await complete(request, scheduler, config, model_name)

    return app


def authorize(request, config):
    """With --api_key set, /v1/* needs "Authorization: Bearer <key>"; the page and /health do not."""
    if config["api_key"] and request.headers.get("authorization") != f"Bearer {config['api_key']}":
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


async def complete(request, scheduler, config, model_name):
    chat = parse_request(await read_body(request, config["max_body_bytes"]), config, model_name)
    prompt, dropped = prompt_for(chat, scheduler.vocab, scheduler.net.config.seq_length)
    job = Job(chat, prompt, asyncio.get_running_loop(), asyncio.Queue())
    scheduler.submit(job)
    completion_id = "chatcmpl-" + uuid.uuid4().hex
    if chat.stream:
        return StreamingResponse(stream_events(job, scheduler, completion_id, model_name, dropped),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    result = await collect(job, scheduler, request)
    if result is None:
        return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
    texts, reasons, usage = result
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                        for i, (text, reason) in enumerate(zip(texts, reasons))],
            "usage": usage, "dropped_characters": dropped}


class Server(uvicorn.Server):
    """uvicorn, with a shutdown that stops the scheduler taking requests and then exits 0."""

    def __init__(self, uvicorn_config, scheduler):
        super().__init__(uvicorn_config)
        self.scheduler = scheduler

    def handle_exit(self, sig, frame):
        self.scheduler.stop_accepting()
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # a clean shutdown is not a crash: exit 0, do not re-raise


# ----------------------------------------------------------------------------------------------
def main(argv):
    config, _, paths = parse_cli(argv, CONFIG, __file__, types=TYPES, rules=RULES, positional=1)
    config["checkpoint"] = default_checkpoint(paths[0] if paths else None)
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    # --- model and scheduler ---
    try:
        net, vocab, _ = load_for_chat(config["checkpoint"], config["device"])
    except (ValueError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    model_name = config["model_name"] or os.path.splitext(os.path.basename(config["checkpoint"]))[0]
    dtype, why = generation_dtype(net, config["dtype"], (1, config["max_batch"]))
    scheduler = Scheduler(net.to(dtype), vocab, config)
    if config["compile"]:
        print("compiling the decode step for every bucket of rows (a one-off wait)...", flush=True)
        compile_buckets(scheduler.engine)
    scheduler.thread.start()
    # --- serve until Ctrl-C or SIGTERM ---
    print(f"LuminaAI | {config['checkpoint']} as {model_name!r} | {net.num_params():,} parameters | "
          f"context {net.config.seq_length} | batch {config['max_batch']} | queue {config['max_queue']} | "
          f"http://{config['host']}:{config['port']}" + (" | API key required" if config["api_key"] else ""), flush=True)
    print(dtype_line(dtype, config["dtype"], why), flush=True)
    app = build_app(scheduler, config, model_name)
    server = Server(uvicorn.Config(app, host=config["host"], port=config["port"], log_level="warning",
                                   timeout_graceful_shutdown=config["shutdown_seconds"]), scheduler)
    try:
        server.run()
    except OSError as e:  # the port is taken, or the host is not this machine's
        sys.exit(f"error: cannot listen on {config['host']}:{config['port']} ({e.strerror or e}); choose another --port")
    print("stopped", flush=True)


# ----------------------------------------------------------------------------------------------
# The chat page: one HTML document, script and style inline, no CDN and no build step. It reads
# the streamed reply with fetch() (EventSource cannot POST) and Stop aborts that fetch, which the
# server sees as a disconnect and cancels at its next step.
# ----------------------------------------------------------------------------------------------
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>LuminaAI chat</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d2330; }
  header { padding: 10px 16px; background: #1d2330; color: #fff; display: flex; gap: 12px; align-items: baseline; }
  header small { color: #aab3c5; }
  main { max-width: 860px; margin: 0 auto; padding: 12px 16px 170px; }
  .msg { white-space: pre-wrap; padding: 8px 12px; border-radius: 8px; margin: 8px 0; max-width: 85%; }
  .user { background: #dbe7ff; margin-left: auto; }
  .assistant { background: #fff; border: 1px solid #dde1e8; }
  .error { background: #ffe3e3; color: #8a1111; }
  footer { position: fixed; bottom: 0; left: 0; right: 0; background: #fff; border-top: 1px solid #dde1e8; padding: 10px 16px; }
  .row { max-width: 860px; margin: 0 auto; display: flex; gap: 8px; flex-wrap: wrap; align-items: center; }
  textarea { flex: 1 1 100%; height: 54px; font: inherit; padding: 6px; }
  label { font-size: 13px; color: #4a5366; }
  input[type=number] { width: 70px; }
  button { font: inherit; padding: 6px 14px; }
</style></head>
<body>
<header><strong>LuminaAI</strong><small id="model"></small><small id="status"></small></header>
<main id="log"></main>
<footer><div class="row">
  <textarea id="input" placeholder="Type a message; Enter sends, Shift+Enter is a new line"></textarea>
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.8"></label>
  <label>top-p <input id="top_p" type="number" min="0" max="1" step="0.05" value="1"></label>
  <label>top-k <input id="top_k" type="number" min="1" step="1" value="40"></label>
  <label>max length <input id="max_tokens" type="number" min="1" step="50" value="400"></label>
  <button id="send">Send</button><button id="stop" disabled>Stop</button><button id="clear">Clear</button>
</div></footer>
<script>
const MODEL = __MODEL__;
const history = [];
let controller = null, apiKey = sessionStorage.getItem("lumina_key") || "";
const $ = (id) => document.getElementById(id);
$("model").textContent = MODEL;

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  window.scrollTo(0, document.body.scrollHeight);
  return div;
}

function busy(on) {
  $("send").disabled = on; $("stop").disabled = !on;
  $("status").textContent = on ? "writing..." : "";
}

function settings() {
  const number = (id) => Number($(id).value);
  return { temperature: number("temperature"), top_p: number("top_p"), top_k: number("top_k"),
           max_tokens: number("max_tokens") };
}

async function send() {
  const text = $("input").value;
  if (!text.trim() || controller) return;
  $("input").value = "";
  history.push({ role: "user", content: text });
  bubble("user", text);
  const reply = bubble("assistant", "");
  controller = new AbortController();
  busy(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", signal: controller.signal,
      headers: { "Content-Type": "application/json", ...(apiKey ? { Authorization: "Bearer " + apiKey } : {}) },
      body: JSON.stringify({ model: MODEL, messages: history, stream: true, ...settings() }) });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      history.pop();
      reply.remove();
      const message = (body.error && body.error.message) || ("the server answered " + response.status);
      if (response.status === 401) {
        apiKey = prompt("This server needs an API key (" + message + "):") || "";
        sessionStorage.setItem("lumina_key", apiKey);
      }
      bubble("error", "Error " + response.status + ": " + message);
      return;
    }
    await readStream(response, reply);
  } catch (e) {
    if (e.name !== "AbortError") bubble("error", "Error: " + e.message);
  } finally {
    if (reply.isConnected) history.push({ role: "assistant", content: reply.textContent });
    controller = null;
    busy(false);
  }
}

async function readStream(response, reply) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split("\\n\\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) reply.textContent += choice.delta.content || "";
      window.scrollTo(0, document.body.scrollHeight);
    }
  }
}

$("send").onclick = send;
$("stop").onclick = () => controller && controller.abort();
$("clear").onclick = () => { if (controller) controller.abort(); history.length = 0; $("log").innerHTML = ""; };
$("input").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } });
</script>
</body></html>
"""


if __name__ == "__main__":
    main(sys.argv[1:])
