"""Which way imports run: the store, then the scoring functions and attention statistics, then
the policies, then attention, then integrations and tools (DESIGN.md, README's layout). Checked
on the source (AST), module-level and inside functions alike: no import points up a level, the
module-level imports of kvkit have no cycle, and the core imports nothing lazily but what is
listed here with its reason (a lazy import that dodges a cycle means a piece is in the wrong room).
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"kvkit": REPO / "kvkit", "kvkit.kernels": REPO / "triton_kernels",
         "kvkit.integrations": REPO / "integrations"}

# lowest first; a module may import its own level and those below
LEVELS = [
    ("kvkit.errors", "kvkit.store", "kvkit.metrics"),
    ("kvkit.scoring", "kvkit.stats"),
    ("kvkit.policies",),
    ("kvkit.attention", "kvkit.kernels"),
]
TOP = len(LEVELS)  # integrations, cli, tools, models, evaluate, testing, the package itself
BESIDE = ("kvkit.moe",)  # the MoE scheduler: of the KV core it shares kvkit.metrics only

# lazy imports the core keeps on purpose: (importer, imported) -> why
LAZY_OK = {
    ("kvkit.attention.decode", "kvkit.kernels"): "TRITON_INTERPRET is read when a kernel is first imported",
    ("kvkit.attention.monitor", "kvkit.metrics"): "prometheus-client only when metrics are on",
}


def modules() -> dict[str, Path]:
    found = {}
    for prefix, root in ROOTS.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            if prefix == "kvkit" and rel.parts[0] in ("kernels", "integrations"):
                continue
            found[name] = path
    return found


MODULES = modules()


def level(name: str) -> int | None:
    if name.startswith(BESIDE):
        return None
    for i, group in enumerate(LEVELS):
        if any(name == g or name.startswith(g + ".") for g in group):
            return i
    return TOP


def resolve(name: str) -> str | None:
    """The kvkit module an import names (the longest known prefix), or None if not ours."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(name: str, path: Path):
    """(imported module, lazy?) for every import of a kvkit module in `path`."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    lazy_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                 and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            if target.startswith("kvkit") and (mod := resolve(target)) and mod != name:
                yield mod, id(node) in lazy_nodes


def test_no_import_points_up_a_level():
    wrong = set()
    for name, path in MODULES.items():
        here = level(name)
        for target, _ in imports(name, path):
            there = level(target)
            if name.startswith(BESIDE):
                if there is not None and there < TOP and target != "kvkit.metrics":
                    wrong.add(f"{name} -> {target} (of the KV core kvkit.moe shares only kvkit.metrics)")
            elif there is None:
                if here != TOP:
                    wrong.add(f"{name} -> {target} (the core does not use kvkit.moe)")
            elif there > here:
                wrong.add(f"{name} (level {here}) -> {target} (level {there})")
    assert not wrong, "imports that point up:\n" + "\n".join(sorted(wrong))


def test_kernels_import_only_torch_and_triton():
    wrong = []
    for name, path in MODULES.items():
        if not name.startswith("kvkit.kernels"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module]
            else:
                continue
            wrong += [f"{name}: {n}" for n in names
                      if n.split(".")[0] not in ("torch", "triton", "__future__", "math", "dataclasses", "typing",
                                                 "functools", "os")]
    assert not wrong, wrong


def test_the_core_imports_nothing_lazily_but_what_is_listed():
    lazy = sorted(f"{name} -> {target}" for name, path in MODULES.items() if (level(name) or TOP) < TOP
                  for target, is_lazy in imports(name, path) if is_lazy and (name, resolve(target)) not in LAZY_OK
                  and not any(name.startswith(k[0]) and target.startswith(k[1]) for k in LAZY_OK))
    assert not lazy, "lazy imports in the core (import at the top, or move the shared piece below both):\n" + \
        "\n".join(lazy)


def test_module_level_imports_have_no_cycle():
    graph = {name: {t for t, is_lazy in imports(name, path) if not is_lazy} for name, path in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # a package's __init__ importing its own submodules is how packages work, not a cycle
            if node.startswith(nxt + ".") or nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
