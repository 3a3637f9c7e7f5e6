"""Open a report page in headless Chromium and return what a reader would get: the DOM after the
page's scripts ran, what the page printed on the console, and a screenshot. Tests use it to
check that the self-contained HTML renders, decodes its images and runs its script cleanly."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHROMIUM_ENV = "VPTLAB_CHROMIUM"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
WINDOW = (1280, 2000)
# Virtual time lets load handlers and timers run before the dump, without waiting in real time.
VIRTUAL_TIME_MS = 5000

# A log record starts with "[pid:tid:MMDD/HHMMSS.micros:LEVEL:where]"; a message with newlines
# continues on the following lines, which carry no such prefix.
_RECORD = re.compile(r"^\[\d+:\d+:\d{4}/\d{6}\.\d+:[A-Z]+:", re.MULTILINE)
# What Chromium 156 (Debian) writes for a page's console message, with --enable-logging=stderr:
#   [11778:11778:1124/050813.129212:INFO:CONSOLE:4] "x", source: file:///.../page.html (4)
# Older versions write `CONSOLE(4)]`. The level is INFO for every page message, console.log,
# console.warn and console.error alike (Chromium passes the real level only for its own
# internal pages), so the log cannot tell an error from a log line. Uncaught exceptions come as
# "Uncaught ReferenceError: ...", rejected promises as "Uncaught (in promise) ...", and a
# Content-Security-Policy violation as "Loading the image '...' violates ...". A failed image
# load prints nothing: that is what the page's data-images-loaded count is for.
_CONSOLE = re.compile(
    r":CONSOLE(?::\d+|\(\d+\))\] \"(?P<message>.*)\", source: (?P<source>.*) \(\d+\)\s*\Z",
    re.DOTALL,
)


@dataclass(frozen=True)
class PageCheck:
    """`dom`: the page serialized after its scripts ran; `console_errors`: every console message
    the page printed (see `_CONSOLE` for why all of them count); `screenshot`: the PNG."""

    dom: str
    console_errors: list[str]
    screenshot: Path


def find_chromium() -> str | None:
    """The Chromium to run: $VPTLAB_CHROMIUM when set (a path or a command name; None if it is
    not an executable, rather than quietly using another), else the first on PATH."""
    chosen = os.environ.get(CHROMIUM_ENV)
    if chosen:
        return shutil.which(chosen)
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


def check_page(
    html: Path, screenshot: Path, chromium: str, *, query: str = "", timeout: float = 120.0
) -> PageCheck:
    """Load `html` twice in headless Chromium, once dumping the DOM and once writing a
    `screenshot` of the window, and collect the console messages of both runs. `query` (e.g.
    "sort=attacks:2") is appended to the file URL; each run is killed after `timeout` seconds."""
    url = Path(html).resolve().as_uri() + (f"?{query}" if query else "")
    screenshot = Path(screenshot).resolve()
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.unlink(missing_ok=True)  # so an old one cannot pass for this run's
    dom, dom_log = _run(chromium, ["--dump-dom", url], timeout)
    _, shot_log = _run(chromium, [f"--screenshot={screenshot}", url], timeout)
    if not screenshot.is_file():
        raise RuntimeError(f"{chromium} wrote no screenshot of {url}:\n{_tail(shot_log)}")
    # Both runs print the page's messages; once each is enough.
    messages = list(dict.fromkeys(console_messages(dom_log) + console_messages(shot_log)))
    return PageCheck(dom, messages, screenshot)


def _run(chromium: str, args: list[str], timeout: float) -> tuple[str, str]:
    """One headless run with a fresh profile (no state shared between runs or with a user's
    browser); returns stdout and stderr. The flags keep it working in sandboxed containers and
    off the network: no sandbox, GPU, QUIC, first-run, sync or update traffic."""
    with tempfile.TemporaryDirectory(prefix="vptlab-chromium-") as profile:
        command = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--virtual-time-budget={VIRTUAL_TIME_MS}",
            "--hide-scrollbars", "--enable-logging=stderr", "--v=0", *args,
        ]  # fmt: skip
        # Its own process group: on a timeout the renderer and GPU processes go too, and
        # cannot keep the pipes open (and this call waiting) after the browser is killed.
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            errors="replace", start_new_session=True,
        ) as process:  # fmt: skip
            try:
                out, err = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired as e:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
                raise RuntimeError(f"{chromium} did not finish in {timeout:g} s: {args}") from e
    if process.returncode != 0:
        raise RuntimeError(f"{chromium} exited with {process.returncode}:\n{_tail(err)}")
    return out, err


def console_messages(log: str) -> list[str]:
    """The page's console messages in a Chromium stderr log, multi-line ones whole."""
    starts = [m.start() for m in _RECORD.finditer(log)] + [len(log)]
    records = (log[a:b] for a, b in itertools.pairwise(starts))
    return [m["message"] for r in records if (m := _CONSOLE.search(r))]


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.splitlines()[-lines:])
