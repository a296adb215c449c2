"""Layout rules read from the source with ``ast``: short flow bodies, the store owns its filesystem.

* Every Prefect flow body (after its docstring) is at most :data:`MAX_FLOW_LINES` lines: a stage
  flow declares its plan, unit task and outputs; planning and reporting live in ``tasks/`` and the
  loop around the unit task in ``flows/stage.py``.
* Nothing outside ``tasks/store.py`` uses a ``.fs`` attribute: reads, writes, listings and moves
  go through :class:`tasks.store.SiteStore`'s operations.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_FLOW_LINES = 60

#: Known exceptions, each with the reason it is left; the test fails when one is fixed, so the
#: lists only shrink.
LONG_FLOWS: dict[str, str] = {}
FS_USERS: dict[str, str] = {}


def _is_flow(decorator: ast.expr) -> bool:
    node = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(node, ast.Name) and node.id == "flow") or (
        isinstance(node, ast.Attribute) and node.attr == "flow"
    )


def body_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the end of the function."""
    body = function.body
    first = body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        body = body[1:]
    if not body:
        return 0
    return (body[-1].end_lineno or body[-1].lineno) - body[0].lineno + 1


def flow_lengths(root: Path = ROOT) -> dict[str, int]:
    """``flows/<file>.py:<function>`` -> body lines, for every function decorated with a flow."""
    found: dict[str, int] = {}
    for path in sorted((root / "flows").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
                _is_flow(d) for d in node.decorator_list
            ):
                found[f"{path.relative_to(root).as_posix()}:{node.name}"] = body_lines(node)
    return found


def fs_users(root: Path = ROOT) -> dict[str, list[int]]:
    """Python file -> lines using an attribute named ``fs`` (``store.fs``, ``self.fs``, ...)."""
    found: dict[str, list[int]] = {}
    for package in ("flows", "tasks", "tests", "benchmarks"):
        for path in sorted((root / package).rglob("*.py")):
            name = path.relative_to(root).as_posix()
            if name == "tasks/store.py":
                continue
            lines = sorted(
                {
                    node.lineno
                    for node in ast.walk(ast.parse(path.read_text(), str(path)))
                    if isinstance(node, ast.Attribute) and node.attr == "fs"
                }
            )
            if lines:
                found[name] = lines
    return found


def test_the_measure_counts_the_body_without_the_docstring(tmp_path: Path) -> None:
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "x.py").write_text(
        "from prefect import flow\n\n"
        "@flow(name='a')\ndef a():\n    '''Doc.\n\n    More.\n    '''\n    x = 1\n    return x\n\n"
        "@flow\ndef b():\n    return [\n        1,\n    ]\n\n"
        "def not_a_flow():\n    pass\n"
    )
    assert flow_lengths(tmp_path) == {"flows/x.py:a": 2, "flows/x.py:b": 3}


def test_no_flow_body_is_longer_than_the_limit() -> None:
    lengths = flow_lengths()
    assert lengths, "no flows found"
    too_long = {
        name: n for name, n in lengths.items() if n > MAX_FLOW_LINES and name not in LONG_FLOWS
    }
    assert not too_long, f"flow bodies over {MAX_FLOW_LINES} lines: {too_long}"
    fixed = [name for name in LONG_FLOWS if lengths.get(name, 0) <= MAX_FLOW_LINES]
    assert not fixed, f"now short (remove from LONG_FLOWS): {fixed}"


def test_only_the_store_uses_its_filesystem() -> None:
    users = fs_users()
    unexpected = {name: lines for name, lines in users.items() if name not in FS_USERS}
    assert not unexpected, f"`.fs` used outside tasks/store.py (use SiteStore): {unexpected}"
    fixed = [name for name in FS_USERS if name not in users]
    assert not fixed, f"no longer uses .fs (remove from FS_USERS): {fixed}"
