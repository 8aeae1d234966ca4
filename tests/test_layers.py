"""The package's import graph: layers only import layers below them, and nothing imports in a circle.

Read from the source with ``ast`` (nothing is imported), so the test sees every import, including
those inside functions.
"""
from __future__ import annotations

import ast
import os

from conftest import REPO

# Lowest first. A module may import modules of its own entry (its own package or module) and of entries in
# lower layers; never an entry of the same layer or of a higher one.
LAYERS = [
    ["ray_merge", "ray_merge.errors", "ray_merge.units", "ray_merge.dtypes", "ray_merge.options",
     "ray_merge.parallel"],
    ["ray_merge.methods", "ray_merge.io", "ray_merge.chat_template", "ray_merge.devices"],
    ["ray_merge.recipe"],
    ["ray_merge.planner"],
    ["ray_merge.execute", "ray_merge.output"],
    ["ray_merge.engine"],
    ["ray_merge.tools", "ray_merge.demo", "evolve"],
    ["ray_merge.cli"],
]
# Only the command line imports project modules inside functions: a command's implementation (and torch,
# Ray, transformers with it) is imported when the command runs, so `ray-merge --help` starts fast.
LAZY_IMPORTS_ALLOWED = ("ray_merge.cli",)
PACKAGES = ("ray_merge", "evolve")


def _modules() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for root, _, files in os.walk(os.path.join(REPO, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(root, f)
                    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    out[rel.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(name: str, path: str) -> list[tuple[str, bool, int]]:
    """(imported project module, at module level?, line) for every import in the file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")
                if not path.endswith("__init__.py"):
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import submodule` imports the submodule
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t.split(".")[0] in PACKAGES:
                found.append((t, id(node) in top, node.lineno))
    return found


def _entry(module: str) -> tuple[int, str]:
    best = None
    for level, entries in enumerate(LAYERS):
        for e in entries:
            if (module == e or module.startswith(e + ".")) and (best is None or len(e) > len(best[1])):
                best = (level, e)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def test_every_module_is_in_a_layer():
    for m in MODULES:
        _entry(m)


def test_imports_only_go_down():
    problems = []
    for m, path in sorted(MODULES.items()):
        level, entry = _entry(m)
        for target, at_top, line in _imports(m, path):
            t_level, t_entry = _entry(target)
            if t_entry == entry or target == "ray_merge" and entry.startswith("ray_merge"):
                continue
            if t_level >= level:
                problems.append(f"{os.path.relpath(path, REPO)}:{line}: {m} (layer {level}) imports {target} "
                                f"(layer {t_level})")
    assert not problems, "imports that go up or sideways:\n" + "\n".join(problems)


def test_no_function_level_imports_of_project_modules():
    problems = []
    for m, path in sorted(MODULES.items()):
        if m.startswith(LAZY_IMPORTS_ALLOWED):
            continue
        for target, at_top, line in _imports(m, path):
            if not at_top:
                problems.append(f"{os.path.relpath(path, REPO)}:{line}: {m} imports {target} inside a function")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    graph = {m: sorted({t for t, _, _ in _imports(m, p) if t != m}) for m, p in MODULES.items()}
    # a package's __init__ is imported before its submodules; count `pkg.sub -> pkg` edges as cycles only
    # when pkg's __init__ really imports something back
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in graph.get(m, []):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
