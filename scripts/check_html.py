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
- a console error (level SEVERE).

Every page is opened again at phone width, where a page that scrolls sideways
as a whole is reported as a warning (it does not fail the check), and
screenshots of the landing page and two chapters are saved at desktop and
phone widths. The link, page and raw-TeX checks are plain functions over files
and strings, tested in tests/test_check_html.py without a browser.
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

SCREENSHOT_SIZES = {"desktop": (1366, 900), "phone": (390, 844)}
EXTERNAL_SCHEMES = ("http", "https", "mailto", "javascript", "data", "tel", "ftp", "file")


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
return {
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


def check_page(driver, base_url: str, page: str, resolver: LinkResolver, timeout: float) -> PageResult:
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
    return PageResult(
        page,
        problems,
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
                    results.append(check_page(driver, base_url, page, resolver, args.timeout))
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
