"""The provenance page's table of what each chapter's stored outputs were run on.

usage: python scripts/landing_table.py [--write | --check]

Reads `metadata["contrastive"]` (profile, device, torch, date, seconds; written by
scripts/execute_notebooks.py) from every notebook in _toc.yml and renders one
Markdown table row per chapter. Without a flag it prints the table; `--write`
replaces the table between the markers in book/provenance.md; `--check` exits 1 when
that table is out of date (tests/test_zoo.py runs the same comparison). Rerun
it with `--write` after `make execute`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_html import toc_files  # noqa: E402 - a sibling script, not an installed package

ROOT = Path(__file__).resolve().parent.parent
INTRO = ROOT / "book" / "provenance.md"
BEGIN = "% BEGIN landing-table"
END = "% END landing-table"
HEADER = [
    "| chapter | profile | device | torch | run on | time to execute |",
    "| --- | --- | --- | --- | --- | --- |",
]


def short_title(notebook: dict, fallback: str) -> str:
    """The chapter's title up to its colon: "CPC" for "CPC: InfoNCE and mutual information"."""
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") == "markdown":
            source = "".join(cell.get("source", []))
            match = re.search(r"^# (.+)$", source, re.M)
            if match:
                return match.group(1).split(":")[0].strip()
    return fallback


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def row(path: Path) -> str:
    notebook = json.loads(path.read_text(encoding="utf-8"))
    title = short_title(notebook, path.stem)
    link = f"{{doc}}`{title} <{path.stem}>`"
    run = notebook.get("metadata", {}).get("contrastive")
    if not run:
        return f"| {link} | outputs not stored yet | | | | |"
    missing = [key for key in ("profile", "device", "torch", "date", "seconds") if key not in run]
    if missing:
        raise ValueError(
            f"{path}: metadata['contrastive'] lacks {', '.join(missing)}; "
            "re-run the notebook with `make execute`."
        )
    date = str(run["date"]).split(" ")[0]
    device = str(run["device"]).replace("|", "/")
    time = duration(run["seconds"])
    return f"| {link} | `{run['profile']}` | {device} | {run['torch']} | {date} | {time} |"


def table(root: Path = ROOT) -> str:
    """One row per notebook of the table of contents, in its order."""
    notebooks = [root / f"{name}.ipynb" for name in toc_files(root / "_toc.yml")]
    return "\n".join(HEADER + [row(path) for path in notebooks if path.is_file()])


def stored_table(intro_text: str) -> str:
    """The table currently between the markers of the provenance page."""
    match = re.search(rf"^{re.escape(BEGIN)}\n(.*?)^{re.escape(END)}$", intro_text, re.S | re.M)
    if not match:
        raise ValueError(
            f"book/provenance.md has no block between `{BEGIN}` and `{END}`: put the markers back "
            "where the table belongs."
        )
    return match.group(1).strip("\n")


def replace_table(intro_text: str, new_table: str) -> str:
    stored_table(intro_text)  # the markers must be there
    pattern = rf"(^{re.escape(BEGIN)}\n).*?(^{re.escape(END)}$)"
    return re.sub(
        pattern, lambda m: m.group(1) + new_table + "\n" + m.group(2), intro_text, count=1, flags=re.S | re.M
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the table in book/provenance.md")
    mode.add_argument(
        "--check", action="store_true", help="exit 1 if book/provenance.md's table is out of date"
    )
    args = parser.parse_args(argv)
    new = table()
    text = INTRO.read_text(encoding="utf-8")
    if args.write:
        INTRO.write_text(replace_table(text, new), encoding="utf-8")
        print(f"wrote the table of {len(new.splitlines()) - 2} chapters into {INTRO.relative_to(ROOT)}")
    elif args.check:
        if stored_table(text) != new:
            print(
                "book/provenance.md's table disagrees with the notebooks' metadata: run "
                "`python scripts/landing_table.py --write`.",
                file=sys.stderr,
            )
            return 1
        print("book/provenance.md's table matches the notebooks' metadata")
    else:
        print(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
