"""ChatAI.py: chat with a trained LuminaAI model; replies stream as they are generated.

Reads  FineTuned_Model.pth when present, else Model.pth, or the checkpoint path given.
Writes nothing, unless you type `save FILE` (the transcript, as chat JSONL).

Run:
  python ChatAI.py                              # interactive; type `help` for the commands
  python ChatAI.py Model.pth --temperature=0.5  # a chosen checkpoint and setting
  python ChatAI.py --prompt "Hello!"            # one reply, for scripts
  python ChatAI.py --probs=3                    # or type `probs 3`: replies shaded by how likely each character
                                                # was (colours on a terminal), the least likely listed under them
  printf 'temp 0.5\\nhello\\nquit\\n' | python ChatAI.py   # piped input, line by line
"""
import contextlib
import dataclasses
import math
import signal
import sys

import torch

from lumina import data
from lumina.checkpoint import CheckpointError, default_checkpoint, load_for_chat
from lumina.config import CHAT_SAMPLING, parse_cli
from lumina.device import DTYPE_CHOICES, dtype_line
from lumina.engine import MAX_TOP_LOGPROBS, beam_search, compile_choice, compile_line, generate, generation_dtype
from lumina.model import CharTransformer
from lumina.training import stop_on_signals
from lumina.vocab import BOT, SPECIAL_TOKENS, TURN_ENDS, USER, Vocab, chat_prompt, unknown_chars_dropped

CONFIG = {
    # --- sampling (each can be changed while chatting; see `help`) ---
    "temperature": CHAT_SAMPLING["temperature"],  # 0.1-2.0: lower is more focused, higher more surprising
    "mode": "topk",             # topk, nucleus or greedy
    "top_k": CHAT_SAMPLING["top_k"],  # topk mode: sample among the k likeliest characters; >= vocabulary keeps all
    "top_p": 0.9,               # nucleus mode: sample among the likeliest characters holding this mass (0-1)
    "repetition_penalty": CHAT_SAMPLING["repetition_penalty"],  # 1.0-2.0; >1 makes recently used characters rarer
    "max_new_chars": CHAT_SAMPLING["max_new_chars"],  # longest reply, in characters
    "num_beams": 1,             # 1 samples as above; 2+ searches that many beams for the likeliest reply (not streamed)
    "length_penalty": 1.0,      # beam search: a reply's log probability is divided by length**this; >0 favours longer
    "seed": None,               # an int makes replies reproducible; None for fresh ones
    # --- display ---
    "probs": 0,                 # 0-20; K > 0: each reply character shaded by the model's probability for it (colours
                                # on a terminal only), then its 5 least likely listed, each with the K likeliest there
    # --- conversation ---
    "system_prompt": "",        # optional first turn that frames every conversation
    "prompt": None,             # a message: print one reply to it and exit
    # --- system ---
    "device": "auto",           # auto (cuda, then mps, then cpu), cpu, cuda, cuda:1 or mps
    "dtype": "auto",            # auto: bf16 on a GPU; on a CPU the faster of float32 and bf16 for one reply, timed
                                # here once (cached); or float32, bfloat16, float16. The weights are cast to it once
    "threads": 1,               # CPU threads; one stream of a small model ran as fast on 1 as on 2 (benchmarks/README.md)
    "compile": "auto",          # torch.compile the decode step: auto (when a trial here, once and cached, says a
                                # session of SESSION_REPLIES replies saves more than compiling costs), true or false
}
TYPES = {"seed": int, "prompt": str}
RULES = {"mode": ("topk", "nucleus", "greedy"), "compile": ("auto", "true", "false"), "threads": (1, 1024),
         "top_k": (1, 10 ** 6), "dtype": DTYPE_CHOICES, "length_penalty": (-5.0, 5.0)}
MAX_BEAMS = 16
SESSION_REPLIES = 10  # compile=auto: the work a chat expects, in replies of max_new_chars (--prompt: one)
LEAST_LIKELY = 5     # probs K: how many of a reply's least likely characters are listed under it
CONTEXT_CHARS = 12   # probs K: how much of the reply before a listed character is quoted
# probs K on a terminal: a character's colour by the model's probability for it, from the top band
# down: (lowest probability of the band, ANSI SGR code or "" for plain text, the colour's name).
SHADES = ((0.5, "", "plain"), (0.2, "33", "yellow"), (0.05, "35", "magenta"), (0.0, "41", "red background"))


@dataclasses.dataclass(frozen=True)
class Shading:
    """How `probs K` draws a reply's characters: each in its band's colour, or with no bands plain
    text. Chosen once at start (shading_for), so the loop that streams a reply never asks where
    its output goes."""
    bands: tuple = ()  # SHADES, or () for plain text

    def paint(self, char, entry):
        """char as written: as it is without an Entry (probs 0), else in its band's colour."""
        # A newline in a background colour would paint the whole next line on many terminals.
        if entry is None or char == "\n":
            return char
        probability = math.exp(entry.logprob)
        code = next((code for low, code, _ in self.bands if probability >= low), "")
        if not code:
            return char
        return f"\x1b[{code}m{char}\x1b[0m"  # then back to the terminal's own colours

    def legend(self):
        """'50-100% plain, 20-50% yellow, ...': each band's probabilities and colour; '' for plain text."""
        spans, high = [], 100
        for low, _, name in self.bands:
            spans.append(f"{low * 100:g}-{high:g}% {name}")
            high = low * 100
        return ", ".join(spans)


def shading_for(stream):
    """Colours where a person reads the reply on a terminal; plain text into a file or a pipe."""
    return Shading(SHADES if stream.isatty() else ())


@dataclasses.dataclass
class Session:
    model: CharTransformer
    vocab: Vocab
    config: dict  # CONFIG with the command line and the chat commands applied
    history: list = dataclasses.field(default_factory=list)  # every message, for `save`
    start: int = 0  # the model sees history[start:]: older turns no longer fit its window
    shading: Shading = Shading()  # how probs K draws replies on stdout


# ----------------------------------------------------------------------------------------------
# Commands: one table both dispatches and prints `help`
# ----------------------------------------------------------------------------------------------
class Quit(Exception):
    """Raised by exit/quit."""


def number_setter(key, kind, low, high, mode=None):
    """A command that sets config[key] to a number in [low, high] (high may depend on the session)."""
    def command(session, arg):
        top = high(session) if callable(high) else high
        try:
            value = kind(arg)
        except ValueError:
            value = None
        if value is None or not low <= value <= top:
            raise ValueError(f"needs a{'n integer' if kind is int else ' number'} from {low} to {top}, got {arg!r}")
        session.config[key] = value
        if mode:
            session.config["mode"] = mode
        return f"{key} set to {value}" + (f" ({mode} sampling)" if mode else "")
    return command


def set_mode(mode, **values):
    def command(session, arg):
        session.config.update(mode=mode, **values)
        return f"switched to {mode} sampling" + "".join(f" ({k}={v})" for k, v in values.items())
    return command


def set_seed(session, arg):
    if arg.lower() in ("none", "off"):
        session.config["seed"] = None
        return "seed off: replies vary"
    try:
        session.config["seed"] = int(arg)
    except ValueError:
        raise ValueError(f"needs an integer, or 'off', got {arg!r}") from None
    return f"seed set to {arg}: the same message gets the same reply"


def clear(session, arg):
    session.history.clear()
    session.start = 0
    return "history cleared"


def show_settings(session, arg):
    return "\n".join(f"  {k} = {v}" for k, v in session.config.items() if k != "prompt")


def save_transcript(session, arg):
    if not arg:
        raise ValueError("needs a file name, e.g. save chat.jsonl")
    try:
        data.write_jsonl(arg, [{"messages": conversation(session, full=True)}])
    except OSError as e:
        raise ValueError(f"could not write {arg}: {e.strerror or e}") from None
    return f"saved {len(session.history)} messages to {arg} (chat JSONL)"


def leave(session, arg):
    raise Quit


def show_help(session, arg):
    rows = [(" | ".join(names) + (f" {usage}" if usage else ""), text) for names, usage, text, _ in COMMANDS]
    return ("Commands work with or without a leading '/'. A message that starts with a command word is "
            "taken as that command.\n" + "\n".join(f"  {left:<22} {text}" for left, text in rows))


# names, argument, help text, handler(session, arg) -> message
COMMANDS = [
    (("exit", "quit"), "", "leave (Ctrl-D works too)", leave),
    (("clear",), "", "forget the conversation so far", clear),
    (("temp",), "X", "temperature, 0.1-2.0", number_setter("temperature", float, 0.1, 2.0)),
    (("topk",), "X", "top-k, 1-vocabulary size; switches to top-k sampling",
     number_setter("top_k", int, 1, lambda s: len(s.vocab), mode="topk")),
    (("topp",), "X", "top-p mass for nucleus sampling, 0-1", number_setter("top_p", float, 0.0, 1.0)),
    (("nucleus",), "", "switch to nucleus (top-p) sampling, p=0.9", set_mode("nucleus", top_p=0.9)),
    (("topk_mode",), "", "switch to top-k sampling", set_mode("topk")),
    (("greedy",), "", "always take the likeliest character", set_mode("greedy")),
    (("rep",), "X", "repetition penalty, 1.0-2.0", number_setter("repetition_penalty", float, 1.0, 2.0)),
    (("max",), "X", "longest reply in characters, 1-10000", number_setter("max_new_chars", int, 1, 10000)),
    (("beam",), "N", f"beam search with N beams, 2-{MAX_BEAMS} (the reply appears whole); 1 turns it off",
     number_setter("num_beams", int, 1, MAX_BEAMS)),
    (("seed",), "X", "reproducible replies; 'seed off' to vary again", set_seed),
    (("probs",), "K", f"how likely each character was: shaded on a terminal, then the {LEAST_LIKELY} least likely, "
     f"each with the K likeliest there; 0-{MAX_TOP_LOGPROBS}, 0 turns it off",
     number_setter("probs", int, 0, MAX_TOP_LOGPROBS)),
    (("settings",), "", "show every current setting", show_settings),
    (("save",), "FILE", "write the conversation as chat JSONL", save_transcript),
    (("help",), "", "this list", show_help),
]
DISPATCH = {name: (usage, handler) for names, usage, _, handler in COMMANDS for name in names}


def run_command(session, line):
    """None when `line` is a chat message; otherwise the command's reply. Raises Quit to leave."""
    word, _, arg = line.strip().removeprefix("/").partition(" ")
    if word.lower() not in DISPATCH:
        return None
    usage, handler = DISPATCH[word.lower()]
    if usage and not arg.strip():
        return f"{word} {usage}: needs a value; nothing changed (type help)"
    try:
        return handler(session, arg.strip())
    except ValueError as e:
        return f"{word} {e}; nothing changed"


# ----------------------------------------------------------------------------------------------
# Conversation and generation
# ----------------------------------------------------------------------------------------------
def conversation(session, full=False):
    """The messages the model sees, or with full=True every message of the session."""
    system = session.config["system_prompt"]
    return ([{"role": "system", "content": system}] if system else []) + session.history[0 if full else session.start:]


def prompt_ids(session):
    """(ids of the prompt for the next reply, messages dropped now): built by vocab.chat_prompt, as
    serve.py builds its prompts; the oldest turns go whole until a quarter of the window is left for
    the reply, and stay in `save`."""
    ids, dropped, _ = chat_prompt(conversation(session), session.vocab, session.model.config.seq_length)
    session.start += dropped
    return ids, dropped


def sampling_args(config):
    mode = config["mode"]
    return dict(temperature=0 if mode == "greedy" else config["temperature"],
                top_k=config["top_k"] if mode == "topk" else None,
                top_p=config["top_p"] if mode == "nucleus" else None,
                repetition_penalty=config["repetition_penalty"])


def reply_ids(session, prompt_ids):
    """(id, Entry) of each id of the reply as it comes: sampled one at a time, or with beam search
    all at the end (a beam's text can change until the search ends, so there is nothing to stream
    before). The Entry is how likely the model found the id (lumina.engine.Entry); with probs 0 it
    is None, and the engine works out no log-probabilities at all."""
    config, stops = session.config, TURN_ENDS
    k = config["probs"] or None
    if config["num_beams"] > 1:
        found = beam_search(session.model, prompt_ids, config["max_new_chars"], config["num_beams"],
                            config["length_penalty"], stops, compile=config["compile"], top_logprobs=k)
        steps = zip(*found) if k else found  # with k, found is (ids, their Entries)
    else:  # with k, generate yields (id, Entry) pairs
        steps = generate(session.model, prompt_ids, config["max_new_chars"], seed=config["seed"], stop_ids=stops,
                         compile=config["compile"], top_logprobs=k, **sampling_args(config))
    if k:
        return steps
    return ((i, None) for i in steps)


def respond(session, text, write, notice, prefix=""):
    """Add the user's message, stream the reply through write() (shaded, with probs on) and end its
    line, and keep it in the history; with probs on, list its least likely characters under it.
    Ctrl-C stops the reply early; what was written stays as the assistant's turn."""
    text, unknown = unknown_chars_dropped(text, session.vocab)
    if unknown:
        notice(f"note: the model has never seen {', '.join(map(repr, unknown))}; left out of your message")
        if not text.strip():
            return ""
    session.history.append({"role": "user", "content": text})
    ids, dropped = prompt_ids(session)
    if dropped:
        notice(f"note: dropped the {dropped} oldest messages to fit the {session.model.config.seq_length}-character context")
    write(prefix)
    drawn = []  # (id, Entry or None) of each new id
    # While characters stream, Ctrl-C is noted and acted on between two of them (a KeyboardInterrupt
    # raised inside a write to stdout can lose that write); a beam search, which writes nothing
    # until it ends, takes it at once.
    streaming = session.config["num_beams"] == 1
    try:
        with stop_on_signals((signal.SIGINT,)) if streaming else contextlib.nullcontext(()) as asked:
            for i, entry in reply_ids(session, ids):
                if asked:
                    raise KeyboardInterrupt
                drawn.append((i, entry))
                if i >= len(SPECIAL_TOKENS):
                    write(session.shading.paint(session.vocab.itos[i], entry))
    except KeyboardInterrupt:
        write(" [stopped]")
    write("\n")
    if session.config["probs"] and drawn:
        write(least_likely(session.vocab, drawn, session.config["probs"], session.shading.legend()))
    reply = session.vocab.decode([i for i, _ in drawn if i >= len(SPECIAL_TOKENS)])
    session.history.append({"role": "assistant", "content": reply})
    return reply


# ----------------------------------------------------------------------------------------------
# probs K: how likely the model found each character of a reply
# ----------------------------------------------------------------------------------------------
def shown(vocab, i):
    """An id as the probs lines show it: a special token by name (<|end|>), a character quoted as
    repr() quotes it, so that a space, a newline or a quote is visible."""
    if i < len(SPECIAL_TOKENS):
        return vocab.itos[i]
    return repr(vocab.itos[i])


def percent(logprob):
    """A log-probability as a percentage: one decimal, or two significant digits below 0.1%."""
    p = 100 * math.exp(logprob)
    if p < 0.1:
        return f"{p:.2g}%"
    return f"{p:.1f}%"


def least_likely(vocab, drawn, k, legend=""):
    """The lines under a reply with probs K, from its (id, Entry) pairs: the LEAST_LIKELY least
    likely ids, least likely first, each with its place in the reply (from 0), the reply before it
    and the k likeliest ids there. The probabilities are the model's own, before the temperature,
    top-k, top-p and repetition penalty reshaped them for the draw."""
    places = sorted(range(len(drawn)), key=lambda n: drawn[n][1].logprob)[:LEAST_LIKELY]
    lines = [f"least likely {len(places)} of {len(drawn)} characters, each with the {k} likeliest in its place "
             "(the model's probabilities, before sampling)"]
    if legend:
        lines[0] += f"; colours: {legend}"
    width = max(map(len, SPECIAL_TOKENS))  # the longest name shown, <|system|>: the columns stay aligned
    for n in places:
        i, entry = drawn[n]
        before = repr(vocab.decode([j for j, _ in drawn[max(0, n - CONTEXT_CHARS):n]]))
        alternatives = "  ".join(f"{shown(vocab, j)} {percent(lp)}" for j, lp in entry.top)
        lines.append(f"  at {n:>3} {shown(vocab, i):<{width}} {percent(entry.logprob):>6}  after "
                     f"{before:<{CONTEXT_CHARS + 2}} | {alternatives}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Start-up and the loop
# ----------------------------------------------------------------------------------------------
def check_config(config):
    """Command-line values get the same range checks as the commands that change them later."""
    scratch = Session(None, Vocab([]), dict(config))
    for command, key in (("temp", "temperature"), ("topp", "top_p"), ("rep", "repetition_penalty"),
                         ("max", "max_new_chars"), ("beam", "num_beams"), ("probs", "probs")):
        try:
            DISPATCH[command][1](scratch, str(config[key]))
        except ValueError as e:
            sys.exit(f"error: --{key} {e}")


def load_session(path, config):
    """(Session, the lines that describe it): the model on its device, and its precision; replies
    shaded in colour (probs K) only when stdout is a terminal."""
    try:
        net, vocab, checkpoint = load_for_chat(path, config["device"])
    except (ValueError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    device = net.tok_emb.weight.device
    dtype, why = generation_dtype(net, config["dtype"], row_counts=(1,))
    net = net.to(dtype)
    info = [f"LuminaAI | {path} | stage {checkpoint.get('stage', '?')} | {net.num_params():,} parameters | "
            f"context {net.config.seq_length} | vocabulary {len(vocab)} | device {device}",
            dtype_line(dtype, config["dtype"], why)]
    asked, expected = config["compile"], config["max_new_chars"] * (1 if config["prompt"] is not None else SESSION_REPLIES)
    rows, why = compile_choice(net, asked, 1, expected)
    info.append(compile_line(rows, 1, asked, why))
    config["compile"] = True if asked == "true" else rows  # auto: one row compiled, a beam search's rows eager
    if rows:
        print("compiling the decode step (a one-off wait; later runs reuse torch's compile cache)...", file=sys.stderr)
        for _ in generate(net, [USER, BOT], 2, temperature=0, stop_ids=(), compile=True):
            pass  # compiled now rather than in the middle of the first reply
    return Session(net, vocab, config, shading=shading_for(sys.stdout)), "\n".join(info)


def read_lines(interactive):
    """Yield input lines; stops at Ctrl-D or end of input. Ctrl-C at the prompt also leaves."""
    while True:
        try:
            yield input("You: ") if interactive else input()
        except EOFError:
            return


def repl(session, interactive):
    write = lambda text: (sys.stdout.write(text), sys.stdout.flush())
    for line in read_lines(interactive):
        if not line.strip():
            continue
        try:
            message = run_command(session, line)
        except Quit:
            return
        if message is not None:
            print(message)
            continue
        respond(session, line, write, lambda note: print(note, file=sys.stderr), prefix="AI: ")


def main(argv):
    config, _, paths = parse_cli(argv, CONFIG, __file__, types=TYPES, rules=RULES, positional=1)
    check_config(config)
    torch.set_num_threads(config["threads"])
    session, info = load_session(default_checkpoint(paths[0] if paths else None), config)
    print(info, file=sys.stderr)
    if config["prompt"] is not None:
        respond(session, config["prompt"], lambda t: (sys.stdout.write(t), sys.stdout.flush()),
                lambda note: print(note, file=sys.stderr))
        return
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (arrow keys and history for input())
        except ImportError:  # Windows has no readline; input() still works
            pass
        print("Type a message, or `help` for the commands.", file=sys.stderr)
    try:
        repl(session, interactive)
    except KeyboardInterrupt:
        print()
    print("bye", file=sys.stderr)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:  # Ctrl-C while loading: leave without a traceback
        sys.exit(130)
