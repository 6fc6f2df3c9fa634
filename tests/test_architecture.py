"""The import rules of docs/architecture.md, checked on the source with ast (issue 17 items 3 and 5).

1. Layers: a module imports only from its own package or from a lower layer (LAYERS, lowest first).
   Packages on the same layer do not import each other.
2. ``library`` and ``networks`` never import a top-level script, ``tools``, ``bench`` or ``tests``.
3. No circles between the modules of one package either.
4. No function over 60 lines (library, networks, scripts, finetune, tools).
Every import counts, at module top or inside a function.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a package may import from any earlier line, never from its own line's others or later ones
LAYERS = [
    ["library.interrupts", "library.log"],
    ["library.errors"],
    ["library.fileio"],
    ["library.config"],
    ["library.models", "library.formats"],
    ["library.data"],
    ["networks"],
    ["library.sampling"],
    ["library.training"],
    ["library.tagging"],
    ["library.captioning", "library.shapes", "library.compat"],
    ["library.train_util"],
]
RANK = {pkg: i for i, line in enumerate(LAYERS) for pkg in line}
SCRIPTS = {p.stem for p in ROOT.glob("*.py")}
FORBIDDEN_ROOTS = SCRIPTS | {"tools", "bench", "tests"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _package(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "networks":
        return "networks"
    if parts[0] == "library" and len(parts) > 1:
        return f"library.{parts[1]}"
    return None


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file; ``from pkg import name`` yields
    ``pkg.name`` as well (the name may be a module)."""
    module = _module_name(path)
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - node.level + 1]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return out


def _sources() -> list[Path]:
    return sorted(p for top in ("library", "networks") for p in (ROOT / top).rglob("*.py"))


def _known_module(name: str) -> str | None:
    """The project module ``name`` refers to (a module file or package), or None (a class, a function)."""
    path = ROOT.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
        return name
    return None


def test_every_package_has_a_layer():
    packages = {_package(_module_name(p)) for p in _sources()} - {None}
    assert packages <= set(RANK), f"packages without a layer: {sorted(packages - set(RANK))}"


def test_imports_follow_the_layers():
    bad = []
    for path in _sources():
        here = _package(_module_name(path))
        for line, target in _imports(path):
            root = target.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line} imports {target}"
            if root in FORBIDDEN_ROOTS:
                bad.append(f"{where} (a script, tool, bench or test)")
                continue
            there = _package(target)
            if there is None or there == here or _known_module(target) is None:
                continue
            if RANK[there] >= RANK[here]:
                bad.append(f"{where} ({there} is not below {here})")
    assert not bad, "imports against docs/architecture.md's layers:\n" + "\n".join(bad)


def _module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in _sources():
        name = _module_name(path)
        targets = {_known_module(t) for _, t in _imports(path)}
        graph[name] = {t for t in targets if t and t != name and _package(t) == _package(name)}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_circles_inside_a_package():
    graph = _module_graph()
    # a package's __init__ importing its own modules is how a package exposes them, not a circle
    for name in graph:
        if _package(name) == name or name in ("library", "networks"):
            graph[name] = set()
    cycle = _find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("source, expected", [
    ("from library.training import loop", "library.training.loop"),
    ("from ..formats import metadata", "library.formats.metadata"),
])
def test_the_checker_resolves_imports(tmp_path, source, expected, monkeypatch):
    """The checker itself: absolute and relative imports resolve to module names."""
    path = ROOT / "library" / "sampling" / "_probe_for_test.py"
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source)
    assert expected in {t for _, t in _imports(path)}


MAX_FUNCTION_LINES = 60


def test_no_function_over_60_lines():
    """Small functions (issue 17 item 6): a longer one is split into named steps."""
    paths = _sources() + sorted(ROOT.glob("*.py")) + sorted((ROOT / "finetune").rglob("*.py")) \
        + sorted((ROOT / "tools").rglob("*.py"))
    long = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


# Issue 17 item 1: the parsed options stop at the runners. Below them (the loop, objective, methods, memory,
# extras, optimizers, the settings sections, file formats, data, models and the network plug-ins) code takes typed
# settings: no argparse import, no ``args`` parameter, no ``Namespace``, no ``getattr(args, ...)``.
BELOW_THE_RUNNER = ["library/training/loop", "library/training/objective", "library/training/methods",
                    "library/training/memory", "library/training/extras", "library/training/optim",
                    "library/training/settings", "library/formats", "library/data", "library/models"]
# the one module that turns options into settings, and convert_model.py's own runner
OPTION_READERS = {"library/training/settings/from_options.py", "library/models/convert.py"}


def _below_the_runner() -> list[Path]:
    paths = [p for folder in BELOW_THE_RUNNER for p in sorted((ROOT / folder).rglob("*.py"))]
    # network plug-ins and their host; the networks/ scripts (merge, resize, extract, ...) are runners themselves
    paths += [p for p in sorted((ROOT / "networks").glob("*.py")) if "def main(" not in p.read_text(encoding="utf-8")]
    return [p for p in paths if str(p.relative_to(ROOT)) not in OPTION_READERS]


def _namespace_uses(path: Path, root: Path = ROOT) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if "argparse" in names:
                found.append(f"{node.lineno}: imports argparse")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if "args" in {a.arg for a in node.args.args + node.args.kwonlyargs}:
                found.append(f"{node.lineno}: {node.name}(args)")
        elif isinstance(node, ast.Name) and node.id == "Namespace" or \
                isinstance(node, ast.Attribute) and node.attr == "Namespace":
            found.append(f"{node.lineno}: Namespace")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and node.args and \
                getattr(node.args[0], "id", None) == "args":
            found.append(f"{node.lineno}: getattr(args, ...)")
    return [f"{path.relative_to(root)}:{line}" for line in found]


def test_nothing_below_the_runner_reads_the_namespace():
    assert len(_below_the_runner()) > 60  # the rule covers the packages, not a handful of files
    bad = [use for path in _below_the_runner() for use in _namespace_uses(path)]
    assert not bad, "argparse options below the runner (take a settings section instead):\n" + "\n".join(bad)


def test_nothing_writes_into_the_options():
    """Derived values are computed once in settings/from_options.py (a new object), never patched in later."""
    bad = []
    for path in sorted((ROOT / "library" / "training").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("setattr", "delattr") and \
                    node.args and getattr(node.args[0], "id", None) in ("args", "parsed"):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            bad += [f"{path.relative_to(ROOT)}:{node.lineno}" for t in targets
                    if isinstance(t, ast.Attribute) and getattr(t.value, "id", None) in ("args", "parsed")]
    assert not bad, "writes into the parsed options:\n" + "\n".join(bad)


def test_the_namespace_check_catches_what_it_should(tmp_path):
    """The checker itself, on a file with each forbidden use."""
    probe = tmp_path / "probe.py"
    probe.write_text("import argparse\ndef f(args):\n    return getattr(args, 'x', None)\n"
                     "def g(o):\n    return argparse.Namespace(**o)\n")
    uses = [u.split(":", 1)[1] for u in _namespace_uses(probe, tmp_path)]
    assert uses == ["1: imports argparse", "2: f(args)", "3: getattr(args, ...)", "5: Namespace"]



# Imports sit at module top (issue 17 item 3): the graph is what the file's head says. An import inside a function
# stays only for a measured start-up cost (diffusers adds ~2 s and transformers ~1 s to an import of torch; the
# options, --help and --dry_run load neither) or an optional package, and its line says which.
LAZY_REASONS = ("start-up", "optional package")


def test_imports_inside_functions_say_why():
    bad = []
    for path in _sources():
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)) and \
                        not any(reason in lines[inner.lineno - 1] for reason in LAZY_REASONS):
                    bad.append(f"{path.relative_to(ROOT)}:{inner.lineno}: {lines[inner.lineno - 1].strip()}")
    assert not bad, "imports inside functions without a start-up or optional-package reason:\n" + "\n".join(
        sorted(set(bad)))


def test_the_architecture_doc_names_every_module():
    """Issue 17 item 5: docs/architecture.md names every module of library/ and networks/ (a line per file)."""
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [str(p.relative_to(ROOT)) for p in _sources() if p.name != "__init__.py" and p.name not in doc]
    assert not missing, "modules docs/architecture.md does not name:\n" + "\n".join(missing)
