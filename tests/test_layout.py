"""The package's layout stays readable: no import cycles, and the CLI is a shell over the library."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bnnslim"
#: Algorithm packages the command line must reach only through the stages and the API.
ALGORITHMS = ("bnnslim.binary", "bnnslim.prune", "bnnslim.runtime", "torch_pruning")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: Path, modules: frozenset[str] = frozenset()) -> list[str]:
    """Modules ``path`` imports when it runs (``if TYPE_CHECKING:`` blocks are annotations only).

    ``from package import submodule`` counts as an import of the submodule alone.
    """
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            found += names if all(n in modules for n in names) else [node.module, *names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = frozenset(modules)
    return {name: {m for m in _runtime_imports(path, known) if m in known and m != name}
            for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_plugin_contract_depends_on_nothing_above_it() -> None:
    imports = _graph()["bnnslim.plugin_types"]
    assert imports <= {"bnnslim.errors"}, sorted(imports)


def test_command_modules_hold_no_algorithm() -> None:
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        reached = [m for m in _runtime_imports(path) if m.startswith(ALGORITHMS)]
        assert not reached, f"{path.name} imports {reached}: call a stage or the API instead"
