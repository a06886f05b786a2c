"""The logic of scripts/check_html.py, on small synthetic pages; no browser needed.

The browser half (MathJax, images, console, layout) runs in `make check-html`; these
tests pin down what it decides from files, strings and the page's measurements: which
pages must exist, which links resolve, which text counts as unrendered source, which
boxes scroll sideways, which figures are shown too small, which cells show notebook
scaffolding and which TeX has a doubled backslash.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

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


# --------------------------------------------------------------------------- the page at desktop width


def test_the_desktop_width_is_1280_px():
    assert check_html.SCREENSHOT_SIZES["desktop"] == (1280, 900)


def box(text="x", scroll=700, client=700, tag="pre", inside=(), part="output", cell=3, classes=""):
    """A box as PAGE_REPORT_JS reports it."""
    return {
        "tag": tag,
        "classes": classes,
        "part": part,
        "cell": cell,
        "label": "train(model)",
        "text": text,
        "scrollWidth": scroll,
        "clientWidth": client,
        "inside": list(inside),
    }


def test_boxes_that_fit_the_column_or_overflow_by_a_rounding_pixel_pass():
    boxes = [box(scroll=700, client=700), box(scroll=701, client=700), box(tag="table", part="")]
    assert check_html.overflow_problems(boxes, 1280) == []


def test_a_box_wider_than_the_column_is_counted_and_named_with_its_widths():
    boxes = [box(text="epoch 1/10  loss 4.1234  " * 10, scroll=1104, client=736), box(scroll=700, client=700)]
    problems = check_html.overflow_problems(boxes, 1280)
    assert len(problems) == 1
    message = problems[0]
    assert message.startswith("1 element(s) scroll sideways inside the column at desktop width (1280 px)")
    assert '<pre> in the output of code cell 3 of the page ("train(model)")' in message
    assert '"epoch 1/10 loss 4.1234 epoch 1/10 loss 4.1234 epoc..."' in message  # the first 50 characters
    assert "is 1104 px wide in a 736 px box" in message
    code = box(text='train(model)\nevaluate(model, split="test")', part="input", scroll=800, client=684)
    message = check_html.overflow_problems([code], 1280)[0]
    assert '<pre> in the input of code cell 3 of the page "train(model) evaluate(' in message


def test_overflow_is_counted_once_at_its_innermost_box_and_only_five_are_named():
    boxes = [
        box(tag="div", classes="math notranslate nohighlight", part="", scroll=900, client=736),
        box(tag="mjx-container", classes="MathJax", part="", scroll=900, client=700, inside=[0]),
    ] + [box(text=f"line {i}", scroll=800, client=736) for i in range(6)]
    message = check_html.overflow_problems(boxes, 1280)[0]
    assert message.startswith("7 element(s)")
    assert "<mjx-container.MathJax>" in message and "<div.math" not in message
    assert '"line 3"' in message and '"line 4"' not in message
    assert message.endswith("; and 2 more")


def image(natural=800, width=736.0, src="../_images/abc.png", alt="../_images/abc.png"):
    """An output image as PAGE_REPORT_JS reports it."""
    return {
        "src": src,
        "alt": alt,
        "cell": 5,
        "label": "plot_curves(runs)",
        "naturalWidth": natural,
        "width": width,
    }


def test_a_figure_shown_at_its_pixel_size_or_at_ninety_percent_of_it_passes():
    images = [image(natural=700, width=700), image(natural=1000, width=900.0), image(natural=500, width=736)]
    assert check_html.small_figure_text_problems(images) == []


def test_a_shrunk_png_figure_fails_with_its_widths_and_the_point_size_its_text_shows_at():
    problems = check_html.small_figure_text_problems([image(natural=1490, width=745.0)])
    assert problems == [
        'figure text too small: the output image of code cell 5 of the page ("plot_curves(runs)") is 1490 px '
        "wide but shown 745 px wide (50%), so its 10 pt text shows at 5.0 pt, below 9 pt"
    ]


def test_png_data_uris_count_and_other_images_or_unshown_ones_do_not():
    png_data = image(natural=1200, width=600, src="data:image/png;base64,iVBORw0KGgo", alt="Loss curves")
    svg = image(natural=1200, width=600, src="../_images/diagram.svg", alt="A diagram")
    jpeg_data = image(natural=1200, width=600, src="data:image/jpeg;base64,/9j/4AAQ", alt="")
    hidden = image(natural=1200, width=0)  # in a collapsed cell: not displayed, nothing to measure
    broken = image(natural=0, width=600)  # the broken-image check reports it
    problems = check_html.small_figure_text_problems([png_data, svg, jpeg_data, hidden, broken])
    assert len(problems) == 1
    assert problems[0].startswith('figure text too small: the output image "Loss curves" of code cell 5')
    assert check_html.MIN_FIGURE_TEXT_PT / check_html.FIGURE_TEXT_PT == 0.9


def block(text, part="output"):
    """A cell's input, output or stderr block as PAGE_REPORT_JS reports it."""
    return {"cell": 2, "label": "import contrastive", "part": part, "text": text}


def test_clean_inputs_and_outputs_have_no_scaffolding():
    blocks = [
        block(
            "import warnings\nwarnings.filterwarnings('ignore')  # the word Warning: in code", part="input"
        ),
        block("epoch 10  loss 3.21  kNN 41.2%\nno Warnings here, nor a warning: in lower case"),
    ]
    assert check_html.scaffolding_problems(blocks) == []


def test_nbval_markers_warning_lines_and_stderr_blocks_are_each_named():
    blocks = [
        block("# NBVAL_IGNORE_OUTPUT\nrun = train(method)", part="input"),
        block("loss 3.2\n/opt/venv/torch/utils.py:12: UserWarning: TypedStorage is deprecated\n  x = y"),
        block("NBVAL_SKIP printed by a helper"),
        block("foo.py:3: DeprecationWarning: old"),
        block("something went to stderr\nsecond line", part="stderr"),
    ]
    problems = check_html.scaffolding_problems(blocks)
    assert problems == [
        'the input of code cell 2 of the page ("import contrastive") shows the nbval marker '
        'NBVAL_IGNORE_OUTPUT: "# NBVAL_IGNORE_OUTPUT"',
        'the output of code cell 2 of the page ("import contrastive") shows a Python warning: '
        '"/opt/venv/torch/utils.py:12: UserWarning: TypedStorage is deprecated"',
        'the output of code cell 2 of the page ("import contrastive") shows the nbval marker NBVAL_SKIP: '
        '"NBVAL_SKIP printed by a helper"',
        'the output of code cell 2 of the page ("import contrastive") shows a Python warning: '
        '"foo.py:3: DeprecationWarning: old"',
        'the output of code cell 2 of the page ("import contrastive") has a stderr block: '
        '"something went to stderr second line"',
    ]


@pytest.mark.parametrize(
    "tex",
    [
        r"\mathcal{L} = -\log \frac{e^{s/\tau}}{\sum_k e^{s_k/\tau}}",
        "\\begin{aligned} a &= b \\\\ c &= d \\end{aligned}",  # a line break before a space
        "\\begin{aligned} a &= b \\\\\n c &= d \\end{aligned}",  # a line break before a newline
        "a \\\\[2pt] b",  # a line break with its spacing
        "a &= b \\\\\\text{ and } c",  # a line break, then \text
    ],
)
def test_tex_with_single_backslashes_and_line_breaks_passes(tex):
    assert check_html.doubled_backslash_problems([tex]) == []


@pytest.mark.parametrize(
    "tex, shown",
    [
        ("L \\\\approx \\\\log N", "\\\\approx"),
        ("\\\\text{loss} = 1", "\\\\text"),
        ("a \\\\\\\\text{b}", "\\\\\\\\text"),
    ],
)
def test_a_doubled_backslash_before_a_letter_is_named_with_its_context(tex, shown):
    problems = check_html.doubled_backslash_problems(["x = 1", tex])
    assert len(problems) == 1
    assert problems[0].startswith(f"TeX with a doubled backslash: {shown} is drawn as a line break")
    assert tex in problems[0]


# --------------------------------------------------------------------------- the book's stylesheet


def test_the_books_stylesheet_wraps_notebook_code_and_output_and_is_loaded_by_every_page():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())["sphinx"]["config"]
    folder = ROOT / config["html_static_path"][0]
    assert config["html_css_files"] == ["contrastive.css"]
    css = (folder / "contrastive.css").read_text()
    rules = re.sub(r"/\*.*?\*/", "", css, flags=re.S)
    assert "div.cell_output pre" in rules and "div.cell_input pre" in rules
    assert "white-space: pre-wrap" in rules and "overflow-wrap: anywhere" in rules


def test_the_books_stylesheet_hides_no_overflow_so_the_check_still_sees_it():
    """The stylesheet makes long lines fit by wrapping them, never by clipping: a block that still does not
    fit (a display equation, a code block in a markdown cell) keeps its scroll bar, and the check fails it."""
    css = re.sub(r"/\*.*?\*/", "", (ROOT / "book" / "_static" / "contrastive.css").read_text(), flags=re.S)
    for name, value in re.findall(r"([a-z-]+)\s*:\s*([^;}]+)", css):
        clips = name in ("overflow", "overflow-x", "overflow-y") and re.search(r"hidden|clip", value)
        assert not clips and name != "text-overflow", f"{name}: {value} hides overflow from the reader"
    still_wide = box(tag="mjx-container", part="", scroll=895, client=688)
    assert check_html.overflow_problems([still_wide], 1280)
