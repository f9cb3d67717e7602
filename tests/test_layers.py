"""The package's layering: imports point one way (no cycle, lazy and type-only imports included), and the modules
at the bottom import only what is below them."""

from __future__ import annotations

import ast
from pathlib import Path


def saepipe_imports(src: Path) -> dict[str, set[str]]:
    """Module -> the saepipe modules it imports anywhere (functions and `if TYPE_CHECKING:` included)."""
    modules = {".".join(f.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): f
               for f in (src / "saepipe").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_imports_have_no_cycles(repo_dir: Path) -> None:
    graph = saepipe_imports(repo_dir / "src")
    cycles, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state[target] == 1:
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif state[target] == 0:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if state[module] == 0:
            visit(module, [module])
    assert not cycles, "import cycles (arrows must point one way):\n" + "\n".join(cycles)


def test_low_modules_import_only_what_is_below_them(repo_dir: Path) -> None:
    graph = saepipe_imports(repo_dir / "src")
    allowed = {"saepipe.paths": {"saepipe.config"}, "saepipe.sae_types": set(), "saepipe.version": set(),
               "saepipe.errors": set()}
    for module, below in allowed.items():
        assert graph[module] <= below, f"{module} imports {sorted(graph[module] - below)}"
    assert not any(t.startswith("saepipe.config") for m, ts in graph.items() if m.startswith("saepipe.sae")
                   for t in ts), "the SAE code reads its knobs as a mapping, never the config that checked them"
