"""The logic of scripts/check_html.py, on small synthetic pages; no browser needed.

The browser half (MathJax, images, console) runs in `make check-html`; these tests
pin down what it decides from files and strings: which pages must exist, which
links resolve, which text counts as unrendered source.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import check_html  # noqa: E402 - a script beside the package, not an installed module


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the table of contents


def test_toc_files_lists_the_root_then_every_chapter_and_section_in_order(tmp_path):
    toc = write(
        tmp_path / "_toc.yml",
        """
format: jb-book
root: book/intro
parts:
  - caption: One
    chapters:
      - file: book/a.ipynb
        sections:
          - file: book/a1
  - caption: Two
    chapters:
      - file: book/b.md
      - url: https://example.org
""",
    )
    assert check_html.toc_files(toc) == ["book/intro", "book/a", "book/a1", "book/b"]
    assert check_html.expected_pages(toc)[-1] == "book/b.html"


def test_a_toc_without_a_root_is_refused_with_a_reason(tmp_path):
    toc = write(tmp_path / "_toc.yml", "parts: []\n")
    with pytest.raises(ValueError, match="no `root` entry"):
        check_html.toc_files(toc)


def test_missing_pages_names_each_chapter_that_has_no_html(tmp_path):
    write(tmp_path / "book" / "intro.html", "<html></html>")
    write(tmp_path / "book" / "a.html", "<html></html>")
    pages = ["book/intro.html", "book/a.html", "book/b.html"]
    assert check_html.missing_pages(tmp_path, pages) == ["book/b.html"]


def test_every_document_of_the_books_toc_has_a_source_file():
    for name in check_html.toc_files(ROOT / "_toc.yml"):
        sources = [ROOT / f"{name}{ext}" for ext in (".ipynb", ".md")]
        assert any(s.is_file() for s in sources), f"_toc.yml names {name}, but neither .ipynb nor .md exists"


# --------------------------------------------------------------------------- links and anchors


@pytest.fixture
def site(tmp_path):
    """A three-page site: a.html with anchors, sub/b.html linking around, sub/index.html."""
    write(tmp_path / "a.html", '<h1 id="top">A</h1><section id="sec-1"></section><a name="old-style"></a>')
    write(tmp_path / "sub" / "index.html", "<p>index</p>")
    write(tmp_path / "image.png", "not really a png")
    write(
        tmp_path / "sub" / "b.html",
        """
<p id="here">B</p>
<a href="../a.html#sec-1">fine</a>
<a href="../a.html#old-style">fine, by name</a>
<a href="#here">fine, same page</a>
<a href="#">the theme's empty anchor</a>
<a href="./">the folder's index</a>
<a href="../image.png">a file</a>
<a href="https://example.org/x.html#nowhere">external</a>
<a href="mailto:someone@example.org">mail</a>
<a href="../a.html#no-such-anchor">broken anchor</a>
<a href="missing.html">broken page</a>
<a href="#nowhere">broken local anchor</a>
<a href="../../outside.html">outside</a>
<svg><a xlink:href="../missing-from-svg.html"><text>label</text></a></svg>
""",
    )
    return tmp_path


def test_parse_page_collects_ids_names_and_links_including_svg_links():
    html = '<div id="x"><a name="y" href="#x"></a><svg><a xlink:href="p.html"/></svg></div>'
    page = check_html.parse_page(html)
    assert page.ids == {"x", "y"}
    assert page.links == ["#x", "p.html"]


def test_resolvable_links_pass_and_each_broken_one_is_named(site):
    problems = check_html.LinkResolver(site).broken_links("sub/b.html")
    assert len(problems) == 5, problems
    joined = "\n".join(problems)
    assert "'../a.html#no-such-anchor': a.html has no anchor #no-such-anchor" in joined
    assert "'missing.html' points to sub/missing.html, which does not exist" in joined
    assert "'#nowhere': sub/b.html has no anchor #nowhere" in joined
    assert "'../../outside.html' points outside the book's build folder" in joined
    assert "'../missing-from-svg.html' points to missing-from-svg.html" in joined


def test_percent_encoded_links_are_decoded_before_they_are_resolved(tmp_path):
    write(tmp_path / "a page.html", '<p id="café">x</p>')
    write(tmp_path / "b.html", '<a href="a%20page.html#caf%C3%A9">x</a><a href="a%20page.html#caf">y</a>')
    problems = check_html.LinkResolver(tmp_path).broken_links("b.html")
    assert problems == ["link 'a%20page.html#caf': a page.html has no anchor #caf"]


def test_root_relative_links_resolve_against_the_build_folder(tmp_path):
    write(tmp_path / "a.html", '<p id="x"></p>')
    write(tmp_path / "deep" / "er" / "b.html", '<a href="/a.html#x">x</a><a href="/b.html">y</a>')
    problems = check_html.LinkResolver(tmp_path).broken_links("deep/er/b.html")
    assert problems == ["link '/b.html' points to b.html, which does not exist"]


# --------------------------------------------------------------------------- text a reader sees


@pytest.mark.parametrize(
    "text, kind",
    [
        ("the loss is $$ L = 1 $$ here", "raw $$"),
        ("as \\begin{aligned} a &= b \\end{aligned} shows", "raw \\begin{"),
        ("by {prf:ref}`thm-infonce-bound` the bound", "raw {prf:"),
        ("a paper {cite:p}`oord2018representation` said", "raw MyST role"),
        ("see {doc}`02_cpc` for more", "raw MyST role"),
        ("the encoder \\(f\\) maps", "raw \\( or \\["),
        ("with a temperature $\\tau$ of 0.1", "raw $...\\command...$"),
    ],
)
def test_raw_tex_is_found_and_named(text, kind):
    problems = check_html.raw_tex_problems(text)
    assert len(problems) >= 1
    assert any(p.startswith(kind) for p in problems), problems


def test_rendered_text_prices_and_plain_braces_are_not_raw_tex():
    text = (
        "The bound is at most log N nats. A run costs $5 and a GPU $2 an hour. "
        "A set {1, 2, 3} and a dict {'a': 1} are not roles; nor is a lone $ sign."
    )
    assert check_html.raw_tex_problems(text) == []


def test_each_kind_of_raw_tex_is_reported_once_with_its_context():
    text = "first $$ a $$ and second $$ b $$"
    problems = check_html.raw_tex_problems(text)
    assert len(problems) == 1 and "first $$ a" in problems[0]


# --------------------------------------------------------------------------- the console


def test_severe_console_messages_fail_and_warnings_do_not():
    entries = [
        {"level": "SEVERE", "message": "http://127.0.0.1/x.js - Failed to load resource: 404"},
        {"level": "WARNING", "message": "something the theme prints"},
        {"level": "INFO", "message": "[PST]: Changed to light mode"},
    ]
    expected = ["console error: http://127.0.0.1/x.js - Failed to load resource: 404"]
    assert check_html.console_problems(entries) == expected


def test_a_console_error_logged_twice_is_reported_once():
    entry = {"level": "SEVERE", "message": "http://127.0.0.1/_images/x.png - Failed to load resource: 404"}
    assert len(check_html.console_problems([entry, dict(entry)])) == 1


def test_only_the_documented_sphinx_duplicate_is_allowed():
    allowed = {
        "level": "SEVERE",
        "message": "http://127.0.0.1:1/book/a.html 62:12 Uncaught SyntaxError: "
        "Identifier 'THEBE_JS_URL' has already been declared",
    }
    other = {"level": "SEVERE", "message": "Uncaught SyntaxError: Identifier 'x' has already been declared"}
    assert check_html.console_problems([allowed]) == []
    assert len(check_html.console_problems([other])) == 1
    assert all(len(why) > 80 for _, why in check_html.CONSOLE_ALLOW), "every allowed message needs its reason"


def test_the_summary_table_has_a_row_per_page_and_counts_problems():
    results = [
        check_html.PageResult("book/a.html", [], math=3, images=1, links=7, seconds=0.5),
        check_html.PageResult("book/bb.html", ["x", "y"], warnings=["w"]),
    ]
    lines = check_html.summary_table(results).splitlines()
    assert len(lines) == 4
    assert lines[2].split() == ["book/a.html", "3", "1", "7", "0.5", "ok"]
    assert lines[3].endswith("2 problem(s), 1 warning(s)")


def test_mathjax_trouble_is_a_failed_mathjax_or_math_without_mathjax():
    trouble = check_html.mathjax_trouble
    assert not trouble({"mathjax": "ok"}, {"mathNodes": 40})
    assert not trouble({"mathjax": "absent"}, {"mathNodes": 0})
    assert trouble({"mathjax": "absent"}, {"mathNodes": 3})
    assert trouble({"mathjax": "never started"}, {"mathNodes": 0})
