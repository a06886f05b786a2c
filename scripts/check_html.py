"""Check the rendered book as a reader sees it, in headless Chromium.

usage: python scripts/check_html.py [--html _build/html] [--toc _toc.yml] [--screenshots _build/screenshots]

Serves the built HTML on a free localhost port, opens every page of the table
of contents in headless Chromium (Debian's /usr/bin/chromium, driven through
/usr/bin/chromedriver with selenium), waits until MathJax has typeset it, and
fails, naming the page and the problem, on:

- a chapter of _toc.yml with no page in the build;
- a MathJax error (an `mjx-merror` element), an unknown TeX command (drawn in
  red), math left untypeset, or MathJax that never started on a page with math;
- raw `$$`, `\\begin{`, `{prf:` or another unrendered MyST role left in the
  text a reader sees (code blocks excluded);
- a broken image (loaded, but with no pixels);
- an internal link to a page or an anchor that does not exist;
- a resource loaded from another host (the book must render offline);
- a console error (level SEVERE);
- at desktop width (1280 px), a code block, cell output, table or display equation in the article
  that scrolls sideways inside the column (its content is more than 1 px wider than its box);
- a PNG figure in a notebook output shown so small that its text is below 9 pt (matplotlib draws it
  at 10 pt or more at the figure's own size, so a figure shown at under 90% of its pixel width);
- notebook scaffolding a reader should not see: an nbval marker (`NBVAL_...`) in a cell's input or
  output, a Python warning line (`UserWarning: ...`) in an output, or a stderr output block;
- TeX with a doubled backslash before a letter (`\\\\text`, `\\\\approx`: a markdown cell that escaped
  its backslashes, drawn as the letters "text" after a line break).

Every page is opened again at phone width, where a page that scrolls sideways
as a whole is reported as a warning (it does not fail the check), and
screenshots of the landing page and two chapters are saved at desktop and
phone widths. The link, page, raw-TeX, overflow, figure-text, scaffolding and doubled-backslash
checks are plain functions over files, strings and what the page's JavaScript measured, tested in
tests/test_check_html.py without a browser.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import http.server
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent

# Text a reader must never see: MyST/LaTeX source that did not render. Code blocks are excluded
# before these are searched, so a printed `$` in a code cell is not a failure.
RAW_TEX_PATTERNS: dict[str, re.Pattern[str]] = {
    "raw $$ (display math that was not parsed)": re.compile(r"\$\$"),
    "raw \\begin{ (a LaTeX environment that was not typeset)": re.compile(r"\\begin\{"),
    "raw {prf: (a theorem directive or reference that did not render)": re.compile(r"\{prf:"),
    "raw MyST role (a role that was not parsed)": re.compile(
        r"\{(?:cite|doc|ref|numref|eq|term|glue)(?::[a-z]+)?\}`"
    ),
    "raw \\( or \\[ (math delimiters MathJax did not process)": re.compile(r"\\[(\[]"),
    "raw $...\\command...$ (inline math that was not parsed)": re.compile(
        r"\$[^$\n]{0,200}\\[A-Za-z]+[^$\n]{0,200}\$"
    ),
}

# Console messages (level SEVERE) that may be ignored, each with the reason it is unavoidable.
# Keep the list short and the patterns narrow: anything else in the console fails the check.
CONSOLE_ALLOW: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(r"Uncaught SyntaxError: Identifier 'THEBE_JS_URL' has already been declared"),
        "Sphinx 7.4 writes every inline script registered after the builder starts twice (once as "
        "filename None, once as ''), and sphinx-thebe's declares `const THEBE_JS_URL`; the second copy "
        "fails to parse and the first still defines everything. Jupyter Book 1.x requires Sphinx < 8, "
        "and the book's configuration cannot remove sphinx-thebe, so the duplicate cannot be avoided.",
    ),
]

SCREENSHOT_SIZES = {"desktop": (1280, 900), "phone": (390, 844)}
EXTERNAL_SCHEMES = ("http", "https", "mailto", "javascript", "data", "tel", "ftp", "file")

# A box whose content is wider than the box by more than this scrolls sideways inside the column;
# 1 px of slack absorbs sub-pixel rounding of widths.
OVERFLOW_SLACK_PX = 1
OVERFLOW_LISTED = 5  # boxes named per page; the message gives the count of all of them

# The notebooks' figures are matplotlib PNGs saved at the figure's own dpi, with their text drawn at
# matplotlib's default 10 pt or larger. Shown at one image pixel per CSS pixel, a figure has (near enough:
# 100 dpi against the browser's 96 px per inch) its own size, so its smallest text shows at
# FIGURE_TEXT_PT x (displayed width / natural width). Below MIN_FIGURE_TEXT_PT it is too small to read:
# the figure is shown at under 90% of its pixel width and should be drawn narrower, or shown wider.
# (A figure saved at twice its dpi for high-density screens would break the assumption; the book has none.)
FIGURE_TEXT_PT = 10.0
MIN_FIGURE_TEXT_PT = 9.0

# Notebook scaffolding a reader should not see in a cell: an nbval marker (in input or output) and a
# Python warning printed in an output (`UserWarning: ...`, `DeprecationWarning: ...`).
NBVAL_MARKER = re.compile(r"NBVAL_\w*")
WARNING_LINE = re.compile(r"\b[A-Z]\w*Warning:")

# TeX with an even run of backslashes directly before a letter: `\\text` in the source, a line break
# followed by the letters "text", from a markdown cell that escaped its backslashes. An odd run
# (`\\\approx`: a line break, then \approx) and `\\` before a space or newline are fine.
DOUBLED_BACKSLASH = re.compile(r"(?<!\\)(?:\\\\)+(?=[A-Za-z])")


# --------------------------------------------------------------------------- the table of contents


def toc_files(toc_path: Path) -> list[str]:
    """Every document the table of contents names, root first, without extension (book/01_instdisc)."""
    toc = yaml.safe_load(toc_path.read_text())
    if not isinstance(toc, dict) or "root" not in toc:
        raise ValueError(f"{toc_path} has no `root` entry: it is not a Jupyter Book table of contents.")
    files = [toc["root"]]

    def walk(entries: Iterable[dict]) -> None:
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            for key in ("sections", "chapters"):
                walk(entry.get(key, []))

    for part in toc.get("parts", []):
        walk(part.get("chapters", []))
    walk(toc.get("chapters", []))
    walk(toc.get("sections", []))
    return [re.sub(r"\.(md|ipynb|rst)$", "", f) for f in files]


def expected_pages(toc_path: Path) -> list[str]:
    """The HTML page (relative to the build folder) of every document in the table of contents."""
    return [f"{name}.html" for name in toc_files(toc_path)]


def missing_pages(html_root: Path, pages: Iterable[str]) -> list[str]:
    return [page for page in pages if not (html_root / page).is_file()]


# --------------------------------------------------------------------------- links and anchors


class _PageParser(HTMLParser):
    """Collects the ids a page defines and the links it makes (HTML anchors and SVG links)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v for k, v in attrs if v is not None}
        if "id" in values:
            self.ids.add(values["id"])
        if tag == "a" and "name" in values:
            self.ids.add(values["name"])
        if tag in ("a", "area"):
            href = values.get("href", values.get("xlink:href"))
            if href is not None:
                self.links.append(href)

    handle_startendtag = handle_starttag


@dataclasses.dataclass
class ParsedPage:
    ids: set[str]
    links: list[str]


def parse_page(html: str) -> ParsedPage:
    parser = _PageParser()
    parser.feed(html)
    parser.close()
    return ParsedPage(parser.ids, parser.links)


class LinkResolver:
    """Resolves the links of built pages against the files and anchor ids of the build folder."""

    def __init__(self, html_root: Path) -> None:
        self.root = html_root.resolve()
        self._pages: dict[Path, ParsedPage] = {}

    def page(self, path: Path) -> ParsedPage:
        path = path.resolve()
        if path not in self._pages:
            self._pages[path] = parse_page(path.read_text(encoding="utf-8", errors="replace"))
        return self._pages[path]

    def problem(self, page: str, href: str) -> str | None:
        """Why `href`, found on `page` (relative to the build folder), does not resolve; None if it does."""
        parts = urlsplit(href)
        if parts.scheme.lower() in EXTERNAL_SCHEMES or parts.netloc:
            return None  # not part of the book; this check runs without network access
        source = (self.root / page).resolve()
        path = unquote(parts.path)
        if not path:
            target = source
        elif path.startswith("/"):
            target = (self.root / path.lstrip("/")).resolve()
        else:
            target = (source.parent / path).resolve()
        if target != self.root and self.root not in target.parents:
            return f"link {href!r} points outside the book's build folder"
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            return f"link {href!r} points to {target.relative_to(self.root)}, which does not exist"
        fragment = unquote(parts.fragment)
        if fragment and target.suffix == ".html" and fragment not in self.page(target).ids:
            return f"link {href!r}: {target.relative_to(self.root)} has no anchor #{fragment}"
        return None

    def broken_links(self, page: str) -> list[str]:
        problems = []
        for href in dict.fromkeys(self.page(self.root / page).links):  # each distinct link once
            problem = self.problem(page, href)
            if problem:
                problems.append(problem)
        return problems


# --------------------------------------------------------------------------- text a reader sees


def raw_tex_problems(text: str) -> list[str]:
    """One message per kind of unrendered source in `text`, quoting its first occurrence."""
    problems = []
    for what, pattern in RAW_TEX_PATTERNS.items():
        match = pattern.search(text)
        if match:
            start = max(0, match.start() - 40)
            context = " ".join(text[start : match.end() + 40].split())
            problems.append(f"{what}: ...{context}...")
    return problems


def console_problems(entries: Iterable[dict]) -> list[str]:
    """The SEVERE console messages that are not on the allow-list, each once (Chromium logs a failed
    image load once per attempt)."""
    problems = []
    for entry in entries:
        if entry.get("level") != "SEVERE":
            continue
        message = str(entry.get("message", ""))
        if any(pattern.search(message) for pattern, _why in CONSOLE_ALLOW):
            continue
        problems.append(f"console error: {message}")
    return list(dict.fromkeys(problems))


# --------------------------------------------------------------------------- the page at desktop width


def _quote(text: str, limit: int) -> str:
    """`text` on one line, its first `limit` characters, in double quotes."""
    text = " ".join(text.split())
    return '"' + (text if len(text) <= limit else text[:limit] + "...") + '"'


def cell_name(item: dict) -> str:
    """How a message names a notebook cell: its position among the page's code cells (`cell`, 1-based; 0
    for something outside a code cell), with its `label`, the first line of its code that is not a comment."""
    if not item.get("cell"):
        return "outside the code cells"
    name = f"code cell {item['cell']} of the page"
    if item.get("label"):
        name += f" ({_quote(item['label'], 50)})"
    return name


def overflow_problems(boxes: list[dict], viewport: int) -> list[str]:
    """One message for the boxes in the article whose content is wider than the box: each scrolls
    sideways inside the column (or spills out of it). A box is a dict with `tag`, `classes`, `cell`,
    `label`, `part` ("input", "output" or ""), `text`, `scrollWidth` and `clientWidth`, and `inside`:
    the indices in `boxes` of the boxes that contain it. A box that contains another overflowing box is
    left out (the equation, not also the div around it): each overflow is counted once, at its innermost
    box."""
    wide = {i: b for i, b in enumerate(boxes) if b["scrollWidth"] > b["clientWidth"] + OVERFLOW_SLACK_PX}
    outer = {j for b in wide.values() for j in b.get("inside", [])}
    innermost = [b for i, b in wide.items() if i not in outer]
    if not innermost:
        return []
    described = []
    for b in innermost[:OVERFLOW_LISTED]:
        element = b["tag"] + "".join(f".{c}" for c in b.get("classes", "").split()[:1])
        # The code of a cell's input is its own label: name the cell by its number alone.
        cell = dict(b, label="") if b.get("label") and b["text"].lstrip().startswith(b["label"]) else b
        where = f" in the {b['part']} of {cell_name(cell)}" if b.get("part") else ""
        described.append(
            f"<{element}>{where} {_quote(b['text'], 50)} is {b['scrollWidth']} px wide "
            f"in a {b['clientWidth']} px box"
        )
    more = f"; and {len(innermost) - OVERFLOW_LISTED} more" if len(innermost) > OVERFLOW_LISTED else ""
    return [
        f"{len(innermost)} element(s) scroll sideways inside the column at desktop width ({viewport} px): "
        + "; ".join(described)
        + more
    ]


def is_png(src: str) -> bool:
    """Whether an image source is a PNG: a data: URI of image/png or a path ending in .png."""
    if src.lower().startswith("data:"):
        return src.lower().startswith("data:image/png")
    return urlsplit(src).path.lower().endswith(".png")


def small_figure_text_problems(images: list[dict]) -> list[str]:
    """The PNG figures of notebook outputs shown so much smaller than their pixel size that their text
    falls below MIN_FIGURE_TEXT_PT (see FIGURE_TEXT_PT). An image is a dict with `src`, `alt`, `cell`,
    `label`, `naturalWidth` and `width` (displayed, in CSS pixels); one not loaded or not displayed
    (width 0) is left to the broken-image check."""
    problems = []
    for image in images:
        if not is_png(image["src"]) or image["naturalWidth"] <= 0 or image["width"] <= 0:
            continue
        scale = image["width"] / image["naturalWidth"]
        points = FIGURE_TEXT_PT * scale
        if points >= MIN_FIGURE_TEXT_PT:
            continue
        alt = image.get("alt", "")
        # myst-nb gives an output image its own path as alt text: that names nothing a reader knows.
        named = f" {_quote(alt, 60)}" if alt and alt != image["src"] and not is_png(alt) else ""
        problems.append(
            f"figure text too small: the output image{named} of {cell_name(image)} is "
            f"{image['naturalWidth']} px wide but shown {image['width']:.0f} px wide ({scale:.0%}), so its "
            f"{FIGURE_TEXT_PT:.0f} pt text shows at {points:.1f} pt, below {MIN_FIGURE_TEXT_PT:.0f} pt"
        )
    return problems


def _line_at(text: str, start: int, limit: int = 100) -> str:
    """The line of `text` that holds position `start`, quoted and cut to `limit` characters."""
    begin = text.rfind("\n", 0, start) + 1
    end = text.find("\n", start)
    return _quote(text[begin : end if end >= 0 else len(text)], limit)


def scaffolding_problems(blocks: list[dict]) -> list[str]:
    """Notebook scaffolding a reader sees: an nbval marker in a cell's input or output, a Python warning
    line in an output, a stderr output block. A block is a dict with `cell`, `label`, `part` ("input",
    "output" or "stderr": a stderr block is also part of its cell's output) and `text`."""
    problems = []
    for block in blocks:
        where, text = cell_name(block), block["text"]
        if block["part"] == "stderr":
            problems.append(f"the output of {where} has a stderr block: {_quote(text, 100)}")
            continue
        marker = NBVAL_MARKER.search(text)
        if marker:
            problems.append(
                f"the {block['part']} of {where} shows the nbval marker {marker.group()}: "
                f"{_line_at(text, marker.start())}"
            )
        warning = WARNING_LINE.search(text) if block["part"] == "output" else None
        if warning:
            problems.append(
                f"the output of {where} shows a Python warning: {_line_at(text, warning.start())}"
            )
    return problems


def doubled_backslash_problems(sources: Iterable[str]) -> list[str]:
    """The TeX sources (as MathJax read them) with a doubled backslash before a letter, each quoted
    around it: `\\\\text` is a line break and the word "text", not the command \\text."""
    problems = []
    for tex in sources:
        match = DOUBLED_BACKSLASH.search(tex)
        if match:
            start = max(0, match.start() - 30)
            word = re.match(r"[A-Za-z]+", tex[match.end() :]).group()
            problems.append(
                f"TeX with a doubled backslash: {match.group()}{word} is drawn as a line break and the "
                f"letters {word!r} (a markdown cell that escaped its backslashes): "
                f"...{' '.join(tex[start : match.end() + 30].split())}..."
            )
    return problems


# --------------------------------------------------------------------------- the browser

# Runs in the page once MathJax is done: everything the checks need, in one round trip.
PAGE_REPORT_JS = r"""
const skip = "script, style, noscript, pre, code, textarea, mjx-container, mjx-assistive-mml";
const clone = document.body.cloneNode(true);
clone.querySelectorAll(skip).forEach((e) => e.remove());
// Block elements are joined with a newline, so that text from two paragraphs never runs together.
clone.querySelectorAll("p, div, li, td, th, h1, h2, h3, h4, h5, h6, dt, dd, figcaption, section, br")
  .forEach((e) => e.append("\n"));
const mathNodes = Array.from(document.querySelectorAll(".math"));
const origin = location.origin;
// A notebook cell is named by its position among the page's code cells and its first line of code
// that is not a comment (the first line is often a `# NBVAL_...` marker).
const cells = Array.from(document.querySelectorAll("article div.cell"));
const cellOf = (e) => {
  const c = e.closest("div.cell");
  const input = c && c.querySelector(".cell_input");
  const lines = input ? input.textContent.split("\n").map((l) => l.trim()).filter((l) => l) : [];
  const label = lines.find((l) => !l.startsWith("#")) || lines[0] || "";
  return {cell: c ? cells.indexOf(c) + 1 : 0, label: label.slice(0, 80)};
};
// Boxes that can be wider than the column: code, outputs, tables, display math. A table does not
// scroll itself (the theme wraps it in a scrolling div), so it is measured by its parent.
const boxes = Array.from(document.querySelectorAll(
  "article pre, article div.cell_output, article table, article div.math, " +
  'article mjx-container[display="true"]'))
  .map((e) => ({element: e, box: e.tagName === "TABLE" ? e.parentElement : e}))
  .filter((b) => b.box.scrollWidth > b.box.clientWidth);
const math = (window.MathJax && MathJax.startup && MathJax.startup.document && MathJax.startup.document.math)
  ? Array.from(MathJax.startup.document.math, (item) => item.math) : [];
return {
  viewport: document.documentElement.clientWidth,
  overflow: boxes.map((b) => Object.assign(cellOf(b.element), {
    tag: b.element.tagName.toLowerCase(),
    classes: typeof b.element.className === "string" ? b.element.className : "",
    part: b.element.closest(".cell_output") ? "output" : b.element.closest(".cell_input") ? "input" : "",
    text: b.element.textContent.trim().slice(0, 200),
    scrollWidth: b.box.scrollWidth,
    clientWidth: b.box.clientWidth,
    inside: boxes.map((o, i) => (o.element !== b.element && o.element.contains(b.element) ? i : -1))
      .filter((i) => i >= 0),
  })),
  figures: Array.from(document.querySelectorAll("article .cell_output img")).map((i) =>
    Object.assign(cellOf(i), {
      src: (i.getAttribute("src") || "").slice(0, 300),
      alt: i.getAttribute("alt") || "",
      naturalWidth: i.naturalWidth,
      width: i.getBoundingClientRect().width,
    })),
  cellText: Array.from(document.querySelectorAll(
    "article .cell_input, article .cell_output, article .cell_output div.output.stderr")).map((e) =>
    Object.assign(cellOf(e), {
      part: e.matches(".stderr") ? "stderr" : e.matches(".cell_input") ? "input" : "output",
      text: e.textContent,
    })),
  tex: math,
  text: clone.textContent,
  mathNodes: mathNodes.length,
  untypeset: mathNodes.filter((e) => !e.querySelector("mjx-container")).length,
  typeset: document.querySelectorAll("mjx-container").length,
  merrors: Array.from(document.querySelectorAll("mjx-merror")).map(
    (e) => e.getAttribute("data-mjx-error") || e.textContent).slice(0, 5),
  // MathJax's noundefined extension draws an unknown macro as red text instead of an error.
  undefinedMacros: Array.from(document.querySelectorAll('mjx-assistive-mml mtext[mathcolor="red"]'))
    .map((e) => e.textContent).slice(0, 5),
  images: document.images.length,
  brokenImages: Array.from(document.images)
    .filter((i) => i.complete && i.naturalWidth === 0).map((i) => i.getAttribute("src")),
  pendingImages: Array.from(document.images).filter((i) => !i.complete).map((i) => i.getAttribute("src")),
  foreign: performance.getEntriesByType("resource").map((r) => r.name)
    .filter((u) => !u.startsWith(origin) && !u.startsWith("data:") && !u.startsWith("blob:")),
  title: document.title,
};
"""

# Loads every image now (lazy ones included) and waits for each to load or fail, then waits
# for MathJax's first typesetting pass if the page loads MathJax.
SETTLE_JS = r"""
const done = arguments[arguments.length - 1];
const limit = arguments[0];
const started = Date.now();
const images = Array.from(document.images);
images.forEach((i) => { i.loading = "eager"; });
const settled = images.map((i) => i.complete ? Promise.resolve() :
  new Promise((r) => { i.addEventListener("load", r); i.addEventListener("error", r); }));
Promise.all(settled).then(() => {
  const wantsMathJax = document.querySelector("script[src*='mathjax' i]") !== null;
  if (!wantsMathJax) { done({mathjax: "absent"}); return; }
  (function poll() {
    const mj = window.MathJax;
    if (mj && mj.startup && mj.startup.promise) {
      mj.startup.promise.then(() => done({mathjax: "ok", version: mj.version}),
                              (e) => done({mathjax: "failed: " + e}));
    } else if (Date.now() - started > limit) {
      done({mathjax: "never started"});
    } else if (document.readyState === "complete" && Date.now() - started > 3000) {
      // Deferred scripts have run by the load event: MathJax's script failed to load or to run.
      done({mathjax: "did not load: its script failed or was blocked (see the console errors)"});
    } else {
      setTimeout(poll, 50);
    }
  })();
});
"""


# The page's width, and the element that sticks out furthest without a scrolling box around it.
NARROW_JS = r"""
const width = document.documentElement.clientWidth;
let worst = null, right = width;
for (const e of document.querySelectorAll("article *")) {
  const box = e.getBoundingClientRect();
  if (box.right <= right + 1 || box.width === 0) continue;
  let p = e.parentElement, contained = false;
  for (; p; p = p.parentElement) {
    if (["auto", "scroll", "hidden"].includes(getComputedStyle(p).overflowX)) { contained = true; break; }
  }
  if (!contained) { worst = e; right = box.right; }
}
const what = worst ? `<${worst.tagName.toLowerCase()}> "${worst.textContent.trim().slice(0, 60)}"`
                   : "none found";
return [document.documentElement.scrollWidth, width, what];
"""


@dataclasses.dataclass
class PageResult:
    page: str
    problems: list[str]
    warnings: list[str] = dataclasses.field(default_factory=list)
    math: int = 0
    images: int = 0
    links: int = 0
    seconds: float = 0.0


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass  # the summary table reports what matters; a line per request would bury it


@contextlib.contextmanager
def serve(html_root: Path) -> Iterator[str]:
    """Serve `html_root` on a free localhost port for the duration of the block; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(html_root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def start_browser(chromium: Path, chromedriver: Path, profile_dir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path, package in ((chromium, "chromium"), (chromedriver, "chromium-driver")):
        if not path.exists():
            raise SystemExit(
                f"{path} not found: install the Debian packages chromium and chromium-driver "
                f"(`apt-get install chromium chromium-driver`; this one comes from {package})."
            )
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    # Headless without a sandbox (CI runs as root) or GPU; the background services are switched off
    # because, with no network, each of their refused connections would be a console error.
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile_dir}",
        "--window-size={},{}".format(*SCREENSHOT_SIZES["desktop"]),
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=str(chromedriver)))


def open_page(driver, url: str, timeout: float) -> dict:
    driver.get(url)
    driver.set_script_timeout(timeout + 10)  # the script's own limit answers first, with a reason
    return driver.execute_async_script(SETTLE_JS, int(timeout * 1000))


def mathjax_trouble(settle: dict, report: dict) -> bool:
    """Whether MathJax failed on the page, or the page has math but no MathJax was found."""
    if settle["mathjax"] not in ("ok", "absent"):
        return True
    return settle["mathjax"] == "absent" and report["mathNodes"] > 0


def check_page(
    driver, base_url: str, page: str, resolver: LinkResolver, timeout: float, figure_text: str = "fail"
) -> PageResult:
    started = time.perf_counter()
    problems: list[str] = []
    for attempt in (1, 2):
        try:
            settle = open_page(driver, base_url + page, timeout)
            report = driver.execute_script(PAGE_REPORT_JS)
        except Exception as error:  # a hung page or a crashed renderer: report it against the page
            if attempt == 2:
                return PageResult(page, [f"the page did not load and settle within {timeout:.0f} s: {error}"])
            continue
        # On a loaded machine a page was once read before its <head> scripts were in the DOM (no MathJax
        # script found, though the HTML has one). One reload tells such a race from a real failure, which
        # shows again and is reported.
        if not mathjax_trouble(settle, report):
            break
    if settle["mathjax"] not in ("ok", "absent"):
        problems.append(f"MathJax {settle['mathjax']}")
    if settle["mathjax"] == "absent" and report["mathNodes"]:
        problems.append(f"{report['mathNodes']} math elements but the page does not load MathJax")
    if report["untypeset"]:
        problems.append(f"{report['untypeset']} of {report['mathNodes']} math elements were not typeset")
    for message in report["merrors"]:
        problems.append(f"MathJax error: {message.strip()[:200]}")
    for macro in report["undefinedMacros"]:
        problems.append(f"MathJax does not know the command {macro.strip()[:100]} (drawn in red)")
    problems += raw_tex_problems(report["text"])
    problems += [f"broken image: {src}" for src in report["brokenImages"]]
    problems += [f"image still loading after {timeout:.0f} s: {src}" for src in report["pendingImages"]]
    problems += [
        f"loaded from another host (the book must render offline): {url}" for url in report["foreign"]
    ]
    problems += resolver.broken_links(page)
    problems += console_problems(driver.get_log("browser"))
    problems += overflow_problems(report["overflow"], report["viewport"])
    figures = small_figure_text_problems(report["figures"])
    problems += scaffolding_problems(report["cellText"])
    problems += doubled_backslash_problems(report["tex"])
    return PageResult(
        page,
        problems + (figures if figure_text == "fail" else []),
        warnings=figures if figure_text == "warn" else [],
        math=report["typeset"],
        images=report["images"],
        links=len(set(resolver.page(resolver.root / page).links)),
        seconds=time.perf_counter() - started,
    )


def save_screenshots(driver, page: str, size_name: str, out_dir: Path) -> list[Path]:
    """The top of the open page and, where it has one, its timeline figure or first theorem or equation."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(page).stem
    driver.execute_script("window.scrollTo(0, 0);")
    saved = [out_dir / f"{stem}-{size_name}.png"]
    driver.save_screenshot(str(saved[-1]))
    moved = driver.execute_script(
        "const e = document.querySelector('.timeline-figure') || document.querySelector('.proof, div.math');"
        "if (!e) return false; e.scrollIntoView({block: 'center'}); return true;"
    )
    if moved:
        time.sleep(0.3)  # the theme's scroll handlers redraw the header and the table of contents
        saved.append(out_dir / f"{stem}-{size_name}-detail.png")
        driver.save_screenshot(str(saved[-1]))
    return saved


def check_narrow(driver, base_url: str, page: str, timeout: float) -> tuple[list[str], list[str]]:
    """Problems and warnings at phone width, where a page may scroll inside its equations, tables and
    code blocks, but should not scroll sideways as a whole. That is a warning, not a failure: one long
    inline code span in a chapter is enough to cause it, and the page stays readable."""
    width = SCREENSHOT_SIZES["phone"][0]
    try:
        open_page(driver, base_url + page, timeout)
    except Exception as error:
        return [f"at phone width the page did not load and settle within {timeout:.0f} s: {error}"], []
    scroll_width, client_width, culprit = driver.execute_script(NARROW_JS)
    warnings = []
    if scroll_width > client_width + 1:
        warnings.append(
            f"at phone width ({width} px) the page is {scroll_width} px wide and scrolls "
            f"sideways; the widest element: {culprit}"
        )
    problems = [f"{p} (phone width)" for p in console_problems(driver.get_log("browser"))]
    return problems, warnings


# --------------------------------------------------------------------------- the command


def summary_table(results: list[PageResult]) -> str:
    width = max(len(r.page) for r in results)
    lines = [
        f"{'page':<{width}}  {'math':>5}  {'images':>6}  {'links':>5}  {'s':>5}  result",
        f"{'-' * width}  {'-' * 5}  {'-' * 6}  {'-' * 5}  {'-' * 5}  ------",
    ]
    for r in results:
        result = "ok" if not r.problems else f"{len(r.problems)} problem(s)"
        if r.warnings:
            result += f", {len(r.warnings)} warning(s)"
        lines.append(
            f"{r.page:<{width}}  {r.math:>5}  {r.images:>6}  {r.links:>5}  {r.seconds:>5.1f}  {result}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=Path, default=ROOT / "_build" / "html", help="the built book")
    parser.add_argument("--toc", type=Path, default=ROOT / "_toc.yml", help="the table of contents")
    parser.add_argument(
        "--screenshots", type=Path, default=ROOT / "_build" / "screenshots", help="folder for the screenshots"
    )
    parser.add_argument(
        "--screenshot-pages",
        nargs="+",
        default=None,
        help="pages to photograph (default: the landing page, book/02_cpc, book/06_simclr)",
    )
    parser.add_argument("--chromium", type=Path, default=Path("/usr/bin/chromium"))
    parser.add_argument("--chromedriver", type=Path, default=Path("/usr/bin/chromedriver"))
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a page may take to settle")
    parser.add_argument(
        "--figure-text",
        choices=["fail", "warn"],
        default="fail",
        help="whether a figure whose text shows below 9 pt fails the page (default) or is a warning",
    )
    args = parser.parse_args(argv)

    html_root = args.html.resolve()
    if not (html_root / "index.html").is_file():
        print(f"{html_root} holds no built book (no index.html): run `make book` first.", file=sys.stderr)
        return 2
    pages = expected_pages(args.toc)
    missing = missing_pages(html_root, pages)
    present = [p for p in pages if p not in missing]
    shots = args.screenshot_pages or [pages[0], "book/02_cpc.html", "book/06_simclr.html"]
    shots = [s if s.endswith(".html") else s + ".html" for s in shots]

    resolver = LinkResolver(html_root)
    results: list[PageResult] = []
    saved: list[Path] = []
    started = time.perf_counter()
    profile_dir = Path(tempfile.mkdtemp(prefix="check-html-chromium-"))
    try:
        with serve(html_root) as base_url:
            driver = start_browser(args.chromium, args.chromedriver, profile_dir)
            try:
                for page in present:
                    results.append(
                        check_page(driver, base_url, page, resolver, args.timeout, args.figure_text)
                    )
                    if page in shots:
                        saved += save_screenshots(driver, page, "desktop", args.screenshots)
                driver.set_window_size(*SCREENSHOT_SIZES["phone"])
                for result in results:
                    problems, warnings = check_narrow(driver, base_url, result.page, args.timeout)
                    result.problems += problems
                    result.warnings += warnings
                    if result.page in shots:
                        saved += save_screenshots(driver, result.page, "phone", args.screenshots)
            finally:
                driver.quit()
    finally:
        shutil.rmtree(profile_dir, ignore_errors=True)
    results += [
        PageResult(p, [f"the table of contents names {p[:-5]}, but the build has no {p}"]) for p in missing
    ]

    print(summary_table(results))
    for r in results:
        for warning in r.warnings:
            print(f"WARN {r.page}: {warning}", file=sys.stderr)
    failures = [(r.page, problem) for r in results for problem in r.problems]
    for page, problem in failures:
        print(f"FAIL {page}: {problem}", file=sys.stderr)
    print(
        f"\n{len(results)} pages checked in {time.perf_counter() - started:.0f} s; "
        f"{len(saved)} screenshots in {os.path.relpath(args.screenshots)}"
    )
    if failures:
        print(f"{len(failures)} problem(s) on {len({p for p, _ in failures})} page(s).", file=sys.stderr)
        return 1
    print("every page rendered cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
