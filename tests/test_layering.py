"""One dependency direction between the packages (issue 8, section 5).

    sam     imports nothing of persam or eval;
    persam  imports nothing of eval, except the command-line entry persam/cli.py;
    eval    may import sam and persam, but not the entry persam.cli.

Every import statement of every module is checked (top level and inside functions), from the
source with ``ast``, so a lazy import inside a function cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sam", "persam", "eval")
ENTRY = "persam.cli"


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, root: Path = ROOT) -> Iterator[Tuple[int, str]]:
    """(line, absolute module name) for every import in the file; relative imports resolved."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node.lineno, target
            for alias in node.names:  # "from persam import cli" imports persam.cli
                yield node.lineno, f"{target}.{alias.name}"


def _is(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def _violations() -> List[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = _module_name(path)
            for line, name in _imports(path):
                where = f"{path.relative_to(ROOT)}:{line} imports {name}"
                if package == "sam" and (_is(name, "persam") or _is(name, "eval")):
                    found.append(where + " (sam must not import persam or eval)")
                elif package == "persam" and _is(name, "eval") and module != ENTRY:
                    found.append(where + f" (only the entry {ENTRY} may import eval)")
                elif package == "eval" and _is(name, ENTRY):
                    found.append(where + f" (eval must not import the entry {ENTRY})")
    return found


def test_packages_import_in_one_direction():
    assert _violations() == []


def test_the_entry_composes_eval():
    """The rule is not vacuous: the entry does import eval, and eval imports persam."""
    entry = [name for _, name in _imports(ROOT / "persam" / "cli.py")]
    assert any(_is(name, "eval") for name in entry)
    eval_imports = [name for path in (ROOT / "eval").rglob("*.py") for _, name in _imports(path)]
    assert any(_is(name, "persam") for name in eval_imports)


@pytest.mark.parametrize(
    "source, path, expected",
    [
        ("from persam.cli import main\n", "eval/x.py", ["persam.cli", "persam.cli.main"]),
        ("from . import cli\n", "persam/x.py", ["persam", "persam.cli"]),
        ("from ..eval import report\n", "persam/x.py", ["eval", "eval.report"]),
        ("def f():\n    import eval.cli\n", "persam/x.py", ["eval.cli"]),
    ],
)
def test_import_parsing(tmp_path, source, path, expected):
    file = tmp_path / path
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(source)
    assert [name for _, name in _imports(file, tmp_path)] == expected
