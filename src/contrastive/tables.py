"""Results tables that a notebook renders as tables and a terminal prints as aligned text.

A chapter's results are rows of already formatted cells ("49.2%", "259 s"); `Table`
holds them with their column names. As the last expression of a notebook cell it is
shown as a Markdown table (the book renders it as an HTML table that wraps to the
column on a phone); `print(table)` gives aligned plain text.
"""

from __future__ import annotations

from collections.abc import Sequence


class Table:
    """Rows of formatted cells under named columns; `align`: "l" or "r" each (default: "lrr...")."""

    def __init__(
        self,
        columns: Sequence[str],
        rows: Sequence[Sequence[object]],
        align: str | None = None,
        caption: str = "",
    ):
        self.columns = [str(c) for c in columns]
        self.rows = [[str(cell) for cell in row] for row in rows]
        width = len(self.columns)
        if width == 0:
            raise ValueError("a table needs at least one column")
        short = [i for i, row in enumerate(self.rows) if len(row) != width]
        if short:
            raise ValueError(f"rows {short} do not have {width} cells, one per column {self.columns}")
        self.align = align or "l" + "r" * (width - 1)
        if len(self.align) != width or set(self.align) - {"l", "r"}:
            raise ValueError(f"align must be {width} letters l or r, got {self.align!r}")
        self.caption = caption

    def _repr_markdown_(self) -> str:
        def line(cells):
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        rule = "| " + " | ".join("---:" if a == "r" else ":---" for a in self.align) + " |"
        head = [f"**{self.caption}**", ""] if self.caption else []
        return "\n".join([*head, line(self.columns), rule, *(line(r) for r in self.rows)]) + "\n"

    def __str__(self) -> str:
        widths = [max(len(r[i]) for r in [self.columns, *self.rows]) for i in range(len(self.columns))]

        def line(cells):
            return "  ".join(
                c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, self.align)
            )

        head = [self.caption] if self.caption else []
        return "\n".join([*head, line(self.columns), *(line(r) for r in self.rows)]).rstrip()

    def __repr__(self) -> str:
        return str(self)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def runs_table(summaries: dict[str, dict], caption: str = "") -> Table:
    """A chapter's closing results: per run (its name -> its `summary.json` or `Run.summary`), the
    final kNN top-1 and linear probe, each beside the same encoder at random init, and training time."""
    rows = [
        [
            name,
            _pct(s["knn_top1"]),
            _pct(s["knn_top1_random_init"]),
            _pct(s.get("linear_top1")),
            _pct(s.get("linear_top1_random_init")),
            f"{s['epochs']}",
            f"{s['train_seconds'] / 60:.1f} min",
        ]
        for name, s in summaries.items()
    ]
    columns = ["run", "kNN", "(init)", "linear", "(init)", "epochs", "training"]
    return Table(columns, rows, caption=caption)


def seeds_table(records: dict[str, list[dict]], caption: str = "") -> Table:
    """Runs over seeds: per run (its name -> the summaries of its seeds, `bench.run_records`), the mean
    of the final kNN top-1 and of the linear probe with their spread over the seeds (largest minus
    smallest, in points; "-" for one run), the mean gain of kNN over the random-init encoder, and mean
    training time."""
    from .bench import mean_and_spread, seed_stats

    rows = []
    for name, runs in records.items():
        knn, knn_spread = seed_stats(runs, "knn_top1")
        gain, _ = mean_and_spread([s["knn_top1"] - s["knn_top1_random_init"] for s in runs])
        lin, lin_spread = seed_stats(runs, "linear_top1")
        minutes = seed_stats(runs, "train_seconds")[0] / 60
        rows.append(
            [
                name,
                f"{len(runs)}",
                _pct(knn),
                f"{100 * knn_spread:.1f}" if len(runs) > 1 else "-",
                f"{100 * gain:+.1f}",
                _pct(lin),
                "-" if lin_spread is None or len(runs) < 2 else f"{100 * lin_spread:.1f}",
                f"{minutes:.1f} min",
            ]
        )
    columns = ["run", "seeds", "kNN", "spread", "gain", "linear", "spread", "training"]
    return Table(columns, rows, caption=caption)
