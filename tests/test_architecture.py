"""The package's shape (docs/architecture.md), enforced: imports point down the stages, no cycles.

An AST walk over every module of `liveavatar_lite`, counting every import wherever it stands (module
level, inside functions, under TYPE_CHECKING), so a lazy import cannot hide an upward dependency.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "liveavatar_lite"

# Rank of each top-level part of the package. A module may import its own part, or a part of a
# LOWER rank; parts of equal rank (conditioning / runtime / decode) may not import each other.
RANKS = {
    "errors": 0, "fileio": 1, "config": 1, "progress": 1,  # the foundation every stage shares
    "model": 2, "audiofile": 2,  # audiofile: speech decoding shared by conditioning/ and decode/
    "artifact": 3,
    "conditioning": 4, "runtime": 4, "decode": 4,
    "pipeline": 5,
    "serve": 6, "evaluate": 6,  # side by side: neither imports the other
    "farm": 7,
    "commands": 8,
    "cli": 9, "__init__": 9,
}
OFFLINE_PACKAGES = ("quantize", "calibration")  # the converter: only `commands/` may load it, lazily


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(["liveavatar_lite", *parts]), path


def _imports(path: Path, module: str, names: bool = True) -> Iterator[tuple[str, int, bool]]:
    """(absolute imported module, line, at module level) for every import in the file; with `names`,
    also `module.name` for each `from module import name` (the name may be a submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rsplit(".", 1)[0]
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, node.lineno, id(node) in top_level
            for alias in node.names if names else ():  # `from . import speech` imports a module
                yield f"{target}.{alias.name}", node.lineno, id(node) in top_level


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _known(module: str, modules: set[str]) -> str | None:
    """The longest prefix of `module` that is one of our modules (drops imported names)."""
    while module and module not in modules:
        module = module.rpartition(".")[0]
    return module or None


def test_every_part_has_a_rank() -> None:
    parts = {_part(m) for m, _ in _modules()}
    assert parts <= set(RANKS), f"give these parts a rank in RANKS and docs/architecture.md: {parts - set(RANKS)}"


def test_imports_point_down_the_stages() -> None:
    modules = {m for m, _ in _modules()}
    bad = []
    for module, path in _modules():
        src = _part(module)
        for target, line, _ in _imports(path, module):
            root = target.split(".")[0]
            if root in OFFLINE_PACKAGES and src != "commands":
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} (only commands/ may)")
            if root != "liveavatar_lite" or target == "liveavatar_lite":
                continue
            dst = _part(target)
            if dst not in RANKS or src == dst:
                continue
            if RANKS[dst] >= RANKS[src] and _known(target, modules) == target:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {src} (rank {RANKS[src]}) imports "
                           f"{target} ({dst}, rank {RANKS[dst]})")
    for module, path in _modules():
        for target, line, _ in _imports(path, module, names=False):
            if target.startswith("liveavatar_lite.") and _known(target, modules) != target:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}, which does not exist")
    assert not bad, "imports against the stage order (docs/architecture.md):\n" + "\n".join(sorted(set(bad)))


def test_no_import_cycles() -> None:
    """No circle among our modules, counting lazy and TYPE_CHECKING imports too."""
    modules = {m for m, _ in _modules()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in _modules():
        for target, _, _ in _imports(path, module):
            dst = _known(target, modules)
            # a package's __init__ is imported on the way to its modules; it is not a real edge
            if dst and dst != module and not module.startswith(dst + ".") and module != "liveavatar_lite":
                graph[module].add(dst)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_commands_import_only_argparse_at_module_level() -> None:
    """`liveavatar-lite --help` imports every command module: they must stay light."""
    modules = {m for m, _ in _modules()}
    heavy = []
    for module, path in _modules():
        if _part(module) != "commands":
            continue
        for target, line, top in _imports(path, module):
            if top and (target.split(".")[0] in ("torch", "numpy", *OFFLINE_PACKAGES)
                        or (_known(target, modules) and _part(target) not in ("errors", "commands", "config"))):
                heavy.append(f"{path.name}:{line} {target}")
    assert not heavy, f"module-level heavy imports in commands/: {heavy}"
