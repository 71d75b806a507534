"""The README's pictures of the lab, taken from real runs of a model:

  images/chat_probs.png    ChatAI.py --probs=3 on a pseudo-terminal: its real output, colours and
                           all, drawn by headless Chromium as a terminal would draw it;
  images/lab_page.png      serve.py's page: a reply shaded by probability, one character clicked
                           (the least likely one), its alternatives and what the model looked at;
  images/lab_compare.png   the page's Compare: two replies side by side.

Run:  python benchmarks/screenshots.py --model=Chat.pth [--message="Hello! How are you today?"] [--seed=1]
"""
import html
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time

import common
from lumina.config import parse_cli
from serve_speed import start_server

CONFIG = {
    "model": None,                          # the checkpoint to show
    "message": "Hello! How are you today?",  # what the learner types
    "compare": "Can you recommend a good book?",  # the message compared on the page
    "seed": 1,                              # ChatAI's seed: the picture can be taken again
    "out": os.path.join(common.ROOT, "benchmarks", "images"),
}
TYPES = {"model": str, "message": str, "compare": str, "out": str}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
ANSI = re.compile(r"\x1b\[(\d*)m")
COLOURS = {"33": "color: #e5c07b", "35": "color: #d670d6", "41": "background: #c0392b; color: #fff"}  # as a terminal draws them


def terminal_output(model, message, seed):
    """What ChatAI.py --probs=3 writes to a terminal for one message (a pseudo-terminal: it colours)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, os.path.join(common.ROOT, "ChatAI.py"), model, "--probs=3", f"--seed={seed}"],
                            stdin=follower, stdout=follower, stderr=follower, cwd=common.ROOT)
    os.close(follower)
    out = b""

    def read_until(text, seconds=300):
        nonlocal out
        deadline = time.time() + seconds
        while text not in out and time.time() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                try:
                    out += os.read(leader, 65536)
                except OSError:
                    return
    read_until(b"You: ")
    os.write(leader, message.encode() + b"\n")
    read_until(b"least likely")
    read_until(b"You: ")
    os.write(leader, b"quit\n")
    proc.wait(60)
    os.close(leader)
    return out.decode("utf-8", "replace").replace("\r\n", "\n")


def as_html(text):
    """Terminal text with SGR colour codes as HTML spans."""
    parts, style = [], None
    for i, piece in enumerate(ANSI.split(text)):
        if i % 2:  # a code
            style = COLOURS.get(piece)
        elif piece:
            escaped = html.escape(piece)
            parts.append(f'<span style="{style}">{escaped}</span>' if style else escaped)
    return ("<html><body style='margin:0;background:#1e1e1e'><pre style='margin:0;padding:14px;color:#ddd;"
            "font:14px/1.4 monospace;white-space:pre-wrap;width:980px'>" + "".join(parts) + "</pre></body></html>")


def page_pictures(model, message, compare, out):
    from playwright.sync_api import expect, sync_playwright
    pairs = os.path.join(tempfile.mkdtemp(prefix="lumina-shots-"), "pairs.jsonl")
    proc, url = start_server(common.ROOT, model, 2, 0, [f"--pairs_file={pairs}"])
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.goto(url + "/")
            page.check("#shade")
            page.fill("#input", message)
            page.click("#send")
            expect(page.locator("#stop")).to_be_disabled(timeout=120000)
            least = page.evaluate("""() => { const spans = [...document.querySelectorAll('.ch')];
                spans.sort((a, b) => a.style.getPropertyValue('--p') - b.style.getPropertyValue('--p'));
                return Number(spans[0].dataset.i); }""")
            page.locator(".ch").nth(least).click()
            expect(page.locator("#attention-note")).to_contain_text("Most:", timeout=30000)
            page.screenshot(path=os.path.join(out, "lab_page.png"))
            page.click("#close")
            page.click("#clear")
            page.fill("#input", compare)
            page.click("#compare")
            expect(page.locator(".compare .choice")).to_have_count(2, timeout=120000)
            page.screenshot(path=os.path.join(out, "lab_compare.png"))
            browser.close()
    finally:
        proc.terminate()
        proc.wait()


def main(argv):
    options = parse_cli(argv, CONFIG, __file__, types=TYPES)[0]
    if not options["model"]:
        raise SystemExit("--model=PATH is needed: the checkpoint to show")
    text = terminal_output(options["model"], options["message"], options["seed"])
    print(text)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1010, "height": 200})
        page.set_content(as_html(text))
        page.screenshot(path=os.path.join(options["out"], "chat_probs.png"), full_page=True)
        browser.close()
    page_pictures(options["model"], options["message"], options["compare"], options["out"])
    print(f"wrote chat_probs.png, lab_page.png and lab_compare.png in {options['out']}")


if __name__ == "__main__":
    main(sys.argv[1:])
