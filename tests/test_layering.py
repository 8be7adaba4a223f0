"""One dependency direction between the layers (issue 24), and no circles.

Layers, lowest first; a module may import its own layer and the ones below it, never above:

    sam             the model core
    persam.errors   the library's errors
    persam.method   the method's steps (imports only sam)
    persam.data     data formats: images, sources, pictures, COCO, concept files
    persam.runs     model loading, the output folder, the local and Ray engines, track
    eval            dataset readers, metrics, benchmark runners
    persam.app      the page
    persam.cli      the command line: the only layer that knows argparse

`persam` itself (the public face, persam/__init__.py) may import the layers up to runs.
Every import statement of every module is checked (top level and inside functions), from the
source with ``ast``, so a lazy import inside a function cannot hide an arrow or a circle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sam", "persam", "eval")
LAYERS = ("sam", "persam.errors", "persam.method", "persam.data", "persam.runs", "eval", "persam.app", "persam.cli")
FACE = "persam"  # persam/__init__.py and persam/__main__.py


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
            for alias in node.names:  # "from persam import cli" imports persam.cli.commands
                yield node.lineno, f"{target}.{alias.name}"


def _is(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def _layer(module: str) -> int:
    """Index in LAYERS; the public face sits just below the app; __main__ at the top."""
    if module == "persam.__main__":
        return len(LAYERS)
    for index in reversed(range(len(LAYERS))):
        if _is(module, LAYERS[index]):
            return index
    assert module == FACE, f"{module} belongs to no layer"
    return LAYERS.index("persam.app") - 0.5


def _project_modules() -> Dict[str, Path]:
    return {_module_name(path, ROOT): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def _resolve(name: str, modules: Dict[str, Path]) -> str:
    """The project module an imported name lives in ("persam.data.io.load_image" -> "persam.data.io")."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def _graph() -> Dict[str, Set[Tuple[str, int]]]:
    modules = _project_modules()
    graph = {}
    for module, path in modules.items():
        edges = set()
        for line, name in _imports(path, ROOT):
            if not any(_is(name, p) for p in PACKAGES):
                continue
            target = _resolve(name, modules)
            if target and target != module and not module.startswith(target + "."):  # a package's own __init__
                edges.add((target, line))
        graph[module] = edges
    return graph


def _upward_arrows() -> List[str]:
    found = []
    paths = _project_modules()
    for module, edges in _graph().items():
        for target, line in sorted(edges):
            if _layer(target) > _layer(module):
                found.append(f"{paths[module].relative_to(ROOT)}:{line} imports {target}, a layer above")
    return found


def _circles() -> List[List[str]]:
    graph = {m: {t for t, _ in edges} for m, edges in _graph().items()}
    circles, state = [], {}

    def visit(module: str, stack: List[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                circles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return circles


def test_layers_import_only_downwards():
    assert _upward_arrows() == []


def test_no_import_circles():
    assert _circles() == []


def test_argparse_only_in_the_command_line_layer():
    users = [str(path.relative_to(ROOT)) for module, path in _project_modules().items()
             if not _is(module, "persam.cli") and any(name == "argparse" for _, name in _imports(path, ROOT))]
    assert users == []


def test_the_rules_are_not_vacuous():
    """The command line imports every layer, and each layer above sam imports a lower one."""
    graph = _graph()
    below = {layer: set() for layer in LAYERS}
    for module, edges in graph.items():
        for target, _ in edges:
            below[LAYERS[int(_layer(module))] if module != FACE and module != "persam.__main__" else "persam.cli"].add(
                LAYERS[int(_layer(target))] if target != FACE else "persam.runs")
    assert {"persam.method", "persam.data", "persam.runs", "eval", "persam.app"} <= below["persam.cli"]
    assert below["persam.method"] <= {"sam", "persam.errors", "persam.method"}
    assert "sam" in below["persam.method"]


@pytest.mark.parametrize(
    "source, path, expected",
    [
        ("from persam.cli import main\n", "eval/x.py", ["persam.cli", "persam.cli.main"]),
        ("from . import cli\n", "persam/x.py", ["persam", "persam.cli"]),
        ("from ..eval import report\n", "persam/x.py", ["eval", "eval.report"]),
        ("def f():\n    import persam.cli.eval_commands\n", "persam/x.py", ["persam.cli.eval_commands"]),
    ],
)
def test_import_parsing(tmp_path, source, path, expected):
    file = tmp_path / path
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(source)
    assert [name for _, name in _imports(file, tmp_path)] == expected


def test_a_circle_and_an_upward_arrow_are_found(tmp_path, monkeypatch):
    """The checks catch what they are for, on a made-up tree."""
    for name, text in {"persam/__init__.py": "", "persam/method/__init__.py": "", "persam/data/__init__.py": "",
                       "persam/method/a.py": "from persam.data import b\n",
                       "persam/data/b.py": "from persam.method import a\n",
                       "sam/__init__.py": "", "eval/__init__.py": ""}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _upward_arrows() == ["persam/method/a.py:1 imports persam.data, a layer above",
                                "persam/method/a.py:1 imports persam.data.b, a layer above"]
    assert _circles() == [["persam.data.b", "persam.method.a", "persam.data.b"]]
