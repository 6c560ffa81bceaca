"""The shape of the code: no import cycles among icma's modules, and the library never reaches
up into the apps or the CLI (README, "Map of the code").

Imports are read with ``ast`` (those inside functions too, since a lazy import is still a
dependency), so nothing is executed.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Folder -> the package it installs as (pyproject.toml maps the apps into icma's namespace).
PACKAGES = {ROOT / "icma": "icma", ROOT / "services": "icma.services",
            ROOT / "workers": "icma.workers"}
APPS = ("icma.services", "icma.workers")
TOP = ("icma.cli", "icma.__main__")  # entry points: they may import everything


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                anchor = name.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import icma.core.chem` -> the module itself
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def _under(name: str, roots) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def test_the_graph_sees_the_real_imports():
    g = graph()
    # a known edge of each kind: plain, lazy (inside a function), and an app's
    assert "icma.core.errors" in g["icma.core.prompts"]
    assert "icma.generation.engines.hf" in g["icma.generation.engines"]
    assert "icma.workers.translator.serving" in g["icma.workers.translator.app"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_library_never_imports_the_apps_or_the_cli():
    bad = [(m, t) for m, targets in graph().items()
           if not _under(m, APPS + TOP) for t in targets if _under(t, APPS + TOP)]
    assert not bad, bad


def test_the_apps_are_independent():
    services, workers = APPS
    assert not [(m, t) for m, targets in graph().items()
                for t in targets if _under(m, (workers,)) and _under(t, (services,))]


def test_the_apps_never_import_the_cli():
    bad = [(m, t) for m, targets in graph().items()
           if _under(m, APPS) for t in targets if _under(t, TOP)]
    assert not bad, bad


#: The library's folders, top to bottom (the README's map): a module imports only modules of
#: its own folder or of folders below it.
LAYERS = ["icma.__main__", "icma.cli", "icma.workers", "icma.services", "icma.server",
          "icma.jobs", "icma.tuning", "icma.evaluation", "icma.generation", "icma.retrieval",
          "icma.core", "icma"]


def _layer(name: str) -> int:
    return next(i for i, root in enumerate(LAYERS) if _under(name, (root,)))


def test_imports_run_down_the_map_of_the_code():
    up = [(m, t) for m, targets in graph().items() for t in targets if _layer(t) < _layer(m)]
    assert not up, "imports that run up the map: " + "; ".join(f"{m} -> {t}" for m, t in up)
