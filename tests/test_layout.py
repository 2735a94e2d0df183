"""The layout of src/gradchain (design §1): imports flow one way, no cycle, no import inside
a function, no type check by class name, and old module paths keep working."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import gradchain

SRC = Path(gradchain.__file__).parent

# Lower layers first; a module may import only from its own layer or a lower one.
LAYERS: list[set[str]] = [
    {"_dist"},
    {"_tree"},
    {"_ops", "_checks"},
    {"base"},
    {"gating", "state", "schedules", "checkpoint"},
    {"combine"},
    {"transforms", "clipping", "gates"},
    {"optim", "hyperparams"},
    {"update"},
    {"adapter"},
    {"integrations"},
    # Stable public paths that only re-export, the public API, and the testing kit.
    {"tree", "fused", "optimizers", "partition", "__init__", "testing"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        out[".".join(("gradchain", *rel.parts)).removesuffix(".__init__")] = path
    return out


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported gradchain module, line, inside a function) for each import in ``path``."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against the package
                    package = module.split(".")[: -child.level if path.name != "__init__.py"
                                                else len(module.split(".")) - child.level + 1]
                    base = ".".join([*package, base] if base else package)
                if not (SRC.parent / base.replace(".", "/") / "__init__.py").exists():
                    found.append((base, child.lineno, in_function))  # a module, not a package
                found.extend((f"{base}.{a.name}", child.lineno, in_function) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return found


MODULES = _modules()


def test_no_import_inside_a_function() -> None:
    bad = [
        f"{path.relative_to(SRC.parent)}:{line} imports {name}"
        for module, path in MODULES.items()
        for name, line, in_function in _imports(path, module)
        if in_function
    ]
    assert not bad, "imports inside functions:\n" + "\n".join(bad)


def _graph() -> dict[str, set[str]]:
    """Module -> the gradchain modules it imports (a package's ``__init__`` is what running
    ``import gradchain.x`` executes first anyway, so ``gradchain`` itself is left out)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for name, _, _ in _imports(path, module):
            if name in MODULES and name != module and name != "gradchain":
                graph[module].add(name)
    return graph


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_imports_flow_one_way() -> None:
    bad = []
    for module, targets in _graph().items():
        src = _top(module)
        for target in targets:
            dst = _top(target)
            if src == dst or dst == "__init__" and src == "__init__":
                continue
            if RANK[dst] > RANK[src]:
                bad.append(f"{module} imports {target} (a higher layer)")
    assert not bad, "\n".join(sorted(bad))


def test_every_module_has_a_layer() -> None:
    missing = sorted({_top(m) for m in MODULES} - set(RANK))
    assert not missing, f"modules not placed in LAYERS: {missing}"


def test_no_type_check_by_class_name() -> None:
    pattern = re.compile(r"__name__\s*(==|!=|in\b)|\.__name__\)\s*(==|!=)")
    bad = [
        f"{path.relative_to(SRC.parent)}:{i}: {line.strip()}"
        for path in MODULES.values()
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    ("old", "names"),
    [
        ("gradchain.tree", ["Leaves", "flatten", "zeros_like_tree", "global_norm", "tree_get",
                            "to_state_dict", "from_state_dict", "config_fields", "leaf_paths"]),
        ("gradchain.fused", ["update_and_apply_"]),
        ("gradchain.optimizers", ["sgd", "adam", "adamw", "scale", "trace", "scale_by_adam",
                                  "scale_by_learning_rate", "add_decayed_weights"]),
        ("gradchain.partition", ["masked", "partition", "MaskedState", "PartitionState"]),
    ],
)
def test_old_module_paths_keep_working(old: str, names: list[str]) -> None:
    module = importlib.import_module(old)
    for name in names:
        assert getattr(module, name) is getattr(gradchain, name, getattr(module, name))
