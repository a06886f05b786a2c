"""The book's reference pages stay true to what they point at.

The objective zoo (book/zoo.md) cites theorems and tests by name, the notation
page names chapters, the landing page's table copies each notebook's metadata
and its timeline links to the chapters, and every chapter ends with exercises.
Each of these can drift when a chapter or a test is renamed; these tests fail
when it does.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import sys
from pathlib import Path

import pytest

from contrastive import losses

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
sys.path.insert(0, str(ROOT / "scripts"))

import check_html  # noqa: E402 - scripts beside the package, not installed modules
import landing_table  # noqa: E402
import make_timeline  # noqa: E402

ZOO = (BOOK / "zoo.md").read_text(encoding="utf-8")
NOTATION = (BOOK / "notation.md").read_text(encoding="utf-8")
# Functions of contrastive.losses that are not objectives the book trains with.
NOT_LOSSES = {"smooth_max": "the Introduction's log-sum-exp, a tool for reading the losses, not one itself"}


def chapter_notebooks() -> list[Path]:
    names = check_html.toc_files(ROOT / "_toc.yml")
    return [ROOT / f"{n}.ipynb" for n in names if (ROOT / f"{n}.ipynb").is_file()]


def markdown_of(notebook: Path) -> str:
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


def theorem_labels() -> set[str]:
    texts = [markdown_of(nb) for nb in BOOK.glob("*.ipynb")] + [p.read_text() for p in BOOK.glob("*.md")]
    return {label for text in texts for label in re.findall(r"^:label: (\S+)$", text, re.M)}


def defined_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


# --------------------------------------------------------------------------- the objective zoo


def test_every_test_the_zoo_cites_exists():
    """The zoo names each test in words, *words of its name* (`file.py`): joined by underscores after
    `test_`, the words must be a test defined in that file."""
    cited = re.findall(r"\*([a-z0-9][a-z0-9 ]*)\* \(`(test_\w+\.py)`\)", ZOO)
    assert len(cited) >= 40, "the zoo should name the tests behind each property"
    files = {f: ROOT / "tests" / f for _, f in cited}
    defined = {f: defined_functions(path) if path.is_file() else set() for f, path in files.items()}
    missing = [f"{f}: {w}" for w, f in cited if "test_" + w.replace(" ", "_") not in defined[f]]
    assert not missing, f"book/zoo.md cites tests that do not exist: {missing}"
    assert "::" not in ZOO, "the zoo names tests in words, not as pytest ids"


def test_every_theorem_the_zoo_references_is_labelled_in_a_chapter():
    referenced = set(re.findall(r"\{prf:ref\}`([^`]+)`", ZOO))
    assert len(referenced) >= 20
    unknown = referenced - theorem_labels()
    assert not unknown, f"book/zoo.md refers to theorems no chapter labels: {sorted(unknown)}"


def test_the_first_code_cell_after_each_theorem_the_zoo_cites_asserts_it():
    referenced = set(re.findall(r"\{prf:ref\}`([^`]+)`", ZOO))
    verified = set()
    for notebook in BOOK.glob("*.ipynb"):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        for i, cell in enumerate(cells):
            labels = re.findall(r"^:label: (\S+)$", "".join(cell["source"]), re.M)
            if cell["cell_type"] != "markdown" or not labels:
                continue
            after = next((c for c in cells[i + 1 :] if c["cell_type"] == "code"), None)
            if after is not None and "assert" in "".join(after["source"]):
                verified.update(labels)
    assert referenced - verified == set(), "the zoo promises a verifying cell after each of these theorems"


def test_every_loss_of_the_package_has_its_section_in_the_zoo():
    functions = [
        name
        for name, f in inspect.getmembers(losses, inspect.isfunction)
        if f.__module__ == losses.__name__ and not name.startswith("_")
    ]
    assert "nt_xent" in functions and "clip_loss" in functions
    absent = [name for name in functions if name not in NOT_LOSSES and f"`{name}(" not in ZOO]
    assert not absent, f"book/zoo.md does not show how to call {absent}: add each loss to the zoo"


def test_every_chapter_the_zoo_names_is_in_the_table_of_contents():
    toc = {Path(n).name for n in check_html.toc_files(ROOT / "_toc.yml")}
    named = set(re.findall(r"\{doc\}`([^`<]+)`", ZOO)) | set(re.findall(r"\{doc\}`([^`<]+)`", NOTATION))
    assert named - toc == set()


def test_the_appendix_pages_are_in_the_toc_before_the_bibliography():
    order = check_html.toc_files(ROOT / "_toc.yml")
    assert order.index("book/notation") < order.index("book/bibliography")
    assert order.index("book/zoo") < order.index("book/bibliography")


# --------------------------------------------------------------------------- the notation page


@pytest.mark.parametrize(
    "symbol",
    [
        r"$\tau$",
        "$K$",
        "$N$",
        "$B$",
        "$m$",
        "$q$, $k_+$",
        "$z = g(h)$",
        "$v$, $v'$",
        "$P_t$, $P_s$",
        r"$s = 1/\tau$",
        "$h = f(x)$",
    ],
)
def test_the_notation_page_defines_the_books_core_symbols(symbol):
    rows = [line for line in NOTATION.splitlines() if line.startswith(f"| {symbol}")]
    assert rows, f"book/notation.md has no row that starts with {symbol}"


# --------------------------------------------------------------------------- the landing page


def test_the_landing_table_matches_every_notebooks_metadata():
    stored = landing_table.stored_table((BOOK / "provenance.md").read_text(encoding="utf-8"))
    assert stored == landing_table.table(), (
        "book/provenance.md's table of what each chapter was run on is out of date: "
        "run `python scripts/landing_table.py --write`"
    )


def test_a_landing_row_copies_the_metadata_and_marks_a_notebook_never_run(tmp_path):
    run = {
        "profile": "gpu",
        "device": "NVIDIA H200",
        "torch": "2.13.0",
        "date": "2026-12-02 10:00 UTC",
        "seconds": 754.0,
        "commit": "abc",
    }
    cells = [{"cell_type": "markdown", "source": ["# CPC: InfoNCE\n", "text"], "metadata": {}}]
    ran = tmp_path / "02_cpc.ipynb"
    ran.write_text(json.dumps({"cells": cells, "metadata": {"contrastive": run}}))
    never = tmp_path / "09_simsiam.ipynb"
    never.write_text(json.dumps({"cells": cells, "metadata": {}}))
    expected = "| {doc}`CPC <02_cpc>` | `gpu` | NVIDIA H200 | 2.13.0 | 2026-12-02 | 13 min |"
    assert landing_table.row(ran) == expected
    assert "outputs not stored yet" in landing_table.row(never)
    del run["seconds"]
    ran.write_text(json.dumps({"cells": cells, "metadata": {"contrastive": run}}))
    with pytest.raises(ValueError, match="lacks seconds"):
        landing_table.row(ran)


def test_replacing_the_landing_table_keeps_the_rest_of_the_page():
    page = "intro\n% BEGIN landing-table\nold\nrows\n% END landing-table\noutro\n"
    expected = "intro\n% BEGIN landing-table\nnew\n% END landing-table\noutro\n"
    assert landing_table.replace_table(page, "new") == expected
    with pytest.raises(ValueError, match="put the markers back"):
        landing_table.replace_table("no markers", "new")


def test_the_timeline_links_every_method_to_a_chapter_of_the_book():
    from contrastive.plotting import TIMELINE

    svg = (BOOK / "images" / "timeline.svg").read_text(encoding="utf-8")
    links = set(check_html.parse_page(svg).links)
    chapters = {make_timeline.CHAPTERS[name] + ".html" for _, name, _ in TIMELINE}
    assert links == chapters, "book/images/timeline.svg is stale: run `python scripts/make_timeline.py`"
    toc = {Path(n).name for n in check_html.toc_files(ROOT / "_toc.yml")}
    assert {c.removesuffix(".html") for c in chapters} <= toc
    assert "{raw} html\n:file: images/timeline.svg" in (BOOK / "intro.md").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- exercises


@pytest.mark.parametrize("notebook", chapter_notebooks(), ids=lambda p: p.stem)
def test_every_chapter_ends_with_a_derivation_a_code_change_and_an_experiment_solved_in_dropdowns(notebook):
    text = markdown_of(notebook)
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings and headings[-1] == "Exercises", f"{notebook.name}: the last section is not Exercises"
    exercises = text[text.rindex("## Exercises") :]
    kinds = dict(re.findall(r"^(\d+)\. \*\*(\w+)\.\*\*", exercises, re.M))
    assert {"Derivation", "Code", "Experiment"} <= set(kinds.values()), f"{notebook.name}: {kinds}"
    solved = set(re.findall(r"^````\{admonition\} Solution to (\d+)\n:class: dropdown$", exercises, re.M))
    unsolved = sorted(set(kinds) - solved)
    assert not unsolved, f"{notebook.name}: exercises {unsolved} lack a solution in a dropdown admonition"


NOTEBOOKS = sorted(BOOK.glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_nbval_markers_are_cell_tags_that_the_reader_does_not_see(path):
    import nbformat
    import nbval_tags

    nb = nbformat.read(path, as_version=4)
    shown = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "NBVAL_" in c.source]
    assert not shown, f"{path.name}: cells {shown} show an nbval comment: run scripts/nbval_tags.py"
    tagged = [t for c in nb.cells for t in c.metadata.get("tags", []) if t.startswith("nbval-")]
    assert tagged and set(tagged) <= set(nbval_tags.MARKERS.values())


def test_the_marker_converter_moves_a_marker_into_the_tag_nbval_reads(tmp_path):
    import nbformat
    import nbval_tags

    marked = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nprint(1)")])
    path = tmp_path / "marked.ipynb"
    nbformat.write(marked, path)
    assert nbval_tags.convert(str(path)) == 1
    cell = nbformat.read(path, as_version=4).cells[0]
    assert cell.source == "print(1)" and cell.metadata["tags"] == ["nbval-check-output"]
    assert nbval_tags.convert(str(path)) == 0  # nothing left to move


def _bibliography_labels() -> list[str]:
    sys.path.insert(0, str(BOOK / "_ext"))
    import authoryear
    from pybtex.database import parse_file
    from pybtex.plugin import find_plugin

    authoryear.setup(None)
    style = find_plugin("pybtex.style.formatting", "authoryear")()
    return [e.label for e in style.format_bibliography(parse_file(BOOK / "references.bib")).entries]


def test_bibliography_labels_are_author_year_as_the_text_cites_and_tell_same_year_works_apart():
    labels = _bibliography_labels()
    assert len(labels) == len(set(labels)), "two entries with one label"
    pattern = re.compile(r"^[^\W\d][^,\\{}]*( and [^,]+| et al\.)?, (\d{4})[a-z]?$")
    assert all(pattern.match(label) for label in labels), [x for x in labels if not pattern.match(x)]
    assert "Gutmann and Hyvärinen, 2010" in labels  # two authors, a TeX accent decoded
    assert {"Chen et al., 2020a", "Chen et al., 2020b"} <= set(labels)  # SimCLR and MoCo v2
    assert "Chen et al., 2020" not in labels  # the ambiguous label is never left as it is
    assert not any(label.startswith("[") or label.isdigit() for label in labels)  # not plain's numbers


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_outputs_hold_no_warning_and_no_progress_bar(path):
    """A page shows results: the data copy is named in the banner and on the provenance page, and
    the epochs are one line each (scripts/execute_notebooks.py turns the bars off)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    found = []
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            text = "".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/plain", ""))
            if re.search(
                r"\w+Warning\b|\d+%\|", text
            ) or "application/vnd.jupyter.widget-view+json" in out.get("data", {}):
                found.append(i)
    assert not found, f"{path.name}: cells {found} store a warning or a progress bar"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_figure_code_is_folded_and_checks_stay_in_view(path):
    """A cell that only draws a figure shows its figure with its code behind a toggle (`hide-input`);
    a cell that asserts is never folded, so the reader sees what is verified."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        source, tags = "".join(cell["source"]), cell["metadata"].get("tags", [])
        draws = any("image/png" in out.get("data", {}) for out in cell.get("outputs", []))
        plotting = len(re.findall(r"\b(plt|ax|axes|fig)\b[.\[]", source)) >= 2
        asserts = re.search(r"^\s*assert", source, re.M)
        if asserts:
            assert "hide-input" not in tags, f"{path.name} cell {i}: a check is folded away"
        elif draws and plotting and "train(" not in source and "load_cifar10" not in source:
            assert "hide-input" in tags, f"{path.name} cell {i}: a figure's code is in view"
