"""Bibliography labels in the author-year form the text cites with: [Chen et al., 2020a].

The text cites with sphinxcontrib-bibtex's `author_year` reference style, "(Chen et al., 2020)";
pybtex's `plain` style would number the bibliography [1]-[n] instead. This extension registers
a pybtex style `authoryear`: entries sorted by author, year and title, each labelled with the
surnames as the citations write them (one, two joined by "and", or the first and "et al."),
a comma and the year, with a, b, ... where one label would name two works.
"""

from __future__ import annotations

from collections import Counter

import latexcodec  # noqa: F401 - registers the "latex" codec that pybtex itself uses
from pybtex.plugin import register_plugin
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.labels import BaseLabelStyle


def _surname(person) -> str:
    """The surname with its particles, TeX accents decoded: 'Hyv\\"arinen' -> 'Hyvärinen'."""
    name = " ".join(person.prelast_names + person.last_names)
    return name.encode("ascii", "backslashreplace").decode("latex").replace("{", "").replace("}", "")


def author_year_label(entry) -> str:
    """ "Oord et al., 2018" for three or more authors, "Gutmann and Hyvärinen, 2010" for two."""
    persons = entry.persons.get("author") or entry.persons.get("editor") or []
    names = [_surname(p) for p in persons]
    if not names:
        who = entry.fields.get("organization") or entry.fields.get("title", "Anonymous")
    elif len(names) == 1:
        who = names[0]
    elif len(names) == 2:
        who = f"{names[0]} and {names[1]}"
    else:
        who = f"{names[0]} et al."
    return f"{who}, {entry.fields.get('year', 'n.d.')}"


class AuthorYearLabels(BaseLabelStyle):
    def format_labels(self, sorted_entries):
        labels = [author_year_label(entry) for entry in sorted_entries]
        total, seen = Counter(labels), Counter()
        for label in labels:
            if total[label] == 1:
                yield label
            else:
                yield label + chr(ord("a") + seen[label])
                seen[label] += 1


class AuthorYearStyle(PlainStyle):
    default_label_style = "authoryear"
    default_sorting_style = "author_year_title"


def setup(app):
    register_plugin("pybtex.style.labels", "authoryear", AuthorYearLabels)
    register_plugin("pybtex.style.formatting", "authoryear", AuthorYearStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
