"""The project's own import graph, read from the source (ast), importing nothing, and the layers it obeys.

Every `import` and `from ... import` of a project module counts, at module level or inside a function: the
heavy imports are lazy, but they run whenever that code does. Two things are built on it: the layering
contract (tests/test_layers.py fails on an upward or circular import) and each DVC stage's code deps
(stages.py: exactly the files its step imports, transitively).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = ("rlhf", "tasks", "flows")

# Top to bottom: a module may import its own layer's modules and those of layers below, never above.
LAYERS = (
    ("rlhf.cli", "rlhf.__main__"),
    ("flows",),
    ("rlhf.orchestration",),
    ("tasks",),
    ("rlhf.studies",),
    ("rlhf.evaluation",),
    ("rlhf.judges",),
    ("rlhf.ml",),
    ("rlhf.core", "rlhf"),
)


def modules(root: str | Path = ".") -> dict[str, Path]:
    """Every project module (dotted name) and its file, relative to `root`."""
    root = Path(root)
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            parts = rel.with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = rel
    return out


def graph(root: str | Path = ".") -> dict[str, set[str]]:
    """module -> the project modules it imports by name (not the parent packages Python runs implicitly)."""
    files = modules(root)
    return {name: _imports(Path(root) / path, name, files) for name, path in files.items()}


def _parse(path: Path, attempts: int = 3) -> ast.Module:
    """ast.parse, again when CPython 3.11 fails it spuriously: its AST depth counter is shared by the threads, so
    a parse that races another thread's (a flow's, inside Prefect) can raise "AST constructor recursion depth
    mismatch" (python/cpython#106905)."""
    text = path.read_text(encoding="utf-8")
    for attempt in range(attempts):
        try:
            return ast.parse(text, str(path))
        except SystemError:
            if attempt == attempts - 1:
                raise


def _imports(path: Path, name: str, files: dict[str, Path]) -> set[str]:
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name in files}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                base = ".".join(filter(None, [*package.split(".")[: len(package.split(".")) - node.level + 1], base]))
            for alias in node.names:  # `from a import b` imports module a.b if there is one, else a's name b
                if f"{base}.{alias.name}" in files:
                    out.add(f"{base}.{alias.name}")
                elif base in files:
                    out.add(base)
    out.discard(name)
    return out


def layer_of(module: str) -> int:
    """The index in LAYERS (0 = top) of the layer a module belongs to: its longest matching prefix."""
    best, index = -1, len(LAYERS)
    for i, names in enumerate(LAYERS):
        for prefix in names:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    return index


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    """Each import from a lower layer into a higher one, as 'a imports b (layer X above layer Y)'."""
    return [
        f"{a} imports {b} ({LAYERS[layer_of(b)][0]} is above {LAYERS[layer_of(a)][0]})"
        for a in sorted(g)
        for b in sorted(g[a])
        if layer_of(b) < layer_of(a)
    ]


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: each strongly connected set of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(found)


def files_imported(start: str, root: str | Path = ".", g: dict[str, set[str]] | None = None) -> list[str]:
    """The project files that importing `start` runs: its own, every module it imports, transitively, and
    the packages around them whose __init__.py holds code (a docstring alone runs nothing). Sorted paths.
    `g`: the graph of `root`, if already read."""
    files, g = modules(root), g or graph(root)
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += g[name]
        todo += [p for p in _parents(name) if p in files]  # Python runs a module's packages first
    return sorted(str(files[n].as_posix()) for n in seen if not _docstring_only(Path(root) / files[n]))


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return path.name == "__init__.py" and all(
        isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str) for s in body
    )
