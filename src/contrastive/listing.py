"""The package's code as a chapter shows it: the algorithm, without its docstring and input checks.

A chapter that derives an objective then shows the function that computes it. The
function's docstring repeats what the chapter says, and its input checks (calls to a
`_check_*` helper, `if ...: raise ...` blocks) guard against misuse rather than
compute anything, so `algorithm` leaves both out and keeps every other line as it
is written, comments included. `show` returns it as a highlighted Python block for
a notebook, or as plain text outside one.
"""

from __future__ import annotations

import ast
import inspect
import textwrap


def _is_check(node: ast.stmt) -> bool:
    """An input check: `_check_x(...)`, or an `if` whose whole body raises."""
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        func = node.value.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        return name.startswith("_check")
    if isinstance(node, ast.If) and not node.orelse:
        return all(isinstance(stmt, ast.Raise) for stmt in node.body)
    return False


def _is_docstring(node: ast.stmt) -> bool:
    value = getattr(node, "value", None)
    return isinstance(node, ast.Expr) and isinstance(value, ast.Constant) and isinstance(value.value, str)


def algorithm(obj) -> str:
    """The source of a function or method without its docstring and its input checks, dedented.

    Statements are removed whole (every line they span); nested blocks are searched too, so a
    check inside a loop goes as well. The rest keeps its text, comments and blank lines.
    """
    source = textwrap.dedent(inspect.getsource(obj))
    tree = ast.parse(source)
    (func,) = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    drop: set[int] = set()

    def visit(body: list[ast.stmt], top: bool) -> None:
        for i, stmt in enumerate(body):
            if (top and i == 0 and _is_docstring(stmt)) or _is_check(stmt):
                start = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
                drop.update(range(start, stmt.end_lineno + 1))
                continue
            for field in ("body", "orelse", "finalbody"):
                inner = getattr(stmt, field, None)
                if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt):
                    visit(inner, top=False)

    visit(func.body, top=True)
    # A name assigned only to be checked (`shapes_ok = ...; if not shapes_ok: raise`) goes with its check.
    kept_statements = [n for n in ast.walk(func) if isinstance(n, ast.stmt) and n.lineno not in drop]
    for stmt in kept_statements:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            name = stmt.targets[0].id
            used = any(
                isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load)
                for other in kept_statements
                if other is not stmt and other is not func
                for n in ast.walk(other)
                if not isinstance(other, (ast.FunctionDef, ast.AsyncFunctionDef))
            )
            if not used:
                drop.update(range(stmt.lineno, stmt.end_lineno + 1))
    lines = source.splitlines()
    kept = [line for number, line in enumerate(lines, start=1) if number not in drop]
    return "\n".join(kept).rstrip() + "\n"


class _Listing(str):
    """A listing that a notebook renders as a highlighted Python block and a terminal prints as text."""

    def _repr_markdown_(self) -> str:
        return f"```python\n{self}```"


def show(obj) -> _Listing:
    """`algorithm(obj)` for display: the last expression of a notebook cell renders it as code."""
    return _Listing(algorithm(obj))
