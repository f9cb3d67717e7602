"""dvc.yaml's code deps match what each stage imports, so editing a module reruns every stage that runs it.

Each `saepipe <stage>` stage runs the CLI entry point (`saepipe.cli`) and then the stage's module; its deps
must cover the static import closure of both within the `saepipe` package. Code is listed by layer: a
subpackage the stage imports from (`src/saepipe/sae`) as its folder, so a new module there needs no dvc.yaml
edit; top-level modules and the stage's own module in `stages/` as files.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from saepipe.cli import STAGES


def module_file(name: str, src: Path) -> Path | None:
    """The file that runs when `name` is imported (a package's `__init__.py`), or None if not under `src`."""
    base = src.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@dataclass
class ModuleImports:
    """What one module may import (anywhere that runs, functions included) and which attributes it reads."""

    imports: set[str] = field(default_factory=set)
    # Imports in a module-level `__getattr__` (PEP 562) run only when a caller reads an attribute the module
    # does not define (`saepipe.load_sae`), so they join the closure only when some module in it does.
    on_getattr: set[str] = field(default_factory=set)
    defines: set[str] = field(default_factory=set)
    reads: set[tuple[str, str]] = field(default_factory=set)  # (module, attribute)


class _Collector(ast.NodeVisitor):
    def __init__(self, package: list[str], imports: set[str], found: ModuleImports, aliases: dict[str, str],
                 attribute_reads: set[tuple[str, str]]) -> None:
        self.package, self.imports, self.found = package, imports, found
        self.aliases, self.attribute_reads = aliases, attribute_reads

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING":  # its body never runs
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.imports.add(alias.name)
            self.aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                alias.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
            base = ".".join(self.package[: len(self.package) - node.level + 1] + ([base] if base else []))
        self.imports.add(base)
        for alias in node.names:
            self.imports.add(f"{base}.{alias.name}")  # `from pkg import submodule` imports it
            self.found.reads.add((base, alias.name))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name):
            self.attribute_reads.add((node.value.id, node.attr))
        self.generic_visit(node)


def module_imports(path: Path, name: str) -> ModuleImports:
    """Parse one module (`name`, at `path`) for its imports, top-level names and attribute reads."""
    found, aliases, attribute_reads = ModuleImports(), {}, set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for stmt in ast.parse(path.read_text(), filename=str(path)).body:
        lazy = isinstance(stmt, ast.FunctionDef) and stmt.name == "__getattr__"
        target = found.on_getattr if lazy else found.imports
        _Collector(package, target, found, aliases, attribute_reads).visit(stmt)
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found.defines.add(stmt.name)
        elif isinstance(stmt, ast.Assign | ast.AnnAssign):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            found.defines.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    found.reads |= {(aliases[local], attr) for local, attr in attribute_reads if local in aliases}
    return found


def import_closure(roots: list[str], src: Path, package: str = "saepipe") -> dict[str, Path]:
    """Every module of `package` that importing `roots` may run, by dotted name, with its file under `src`.

    Importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py` first, so parent packages are included;
    names that are not modules (`from a.b import some_function`) are dropped.
    """
    found: dict[str, Path] = {}
    parsed: dict[str, ModuleImports] = {}
    pending, triggered = list(roots), set()
    while pending:
        name = pending.pop()
        if name not in found and (name == package or name.startswith(package + ".")):
            path = module_file(name, src)
            if path is not None:
                found[name], parsed[name] = path, module_imports(path, name)
                pending.extend([name.rpartition(".")[0], *parsed[name].imports])
        if not pending:  # settle the PEP 562 imports the closure so far triggers
            reads = {read for imports in parsed.values() for read in imports.reads}
            for module, imports in parsed.items():
                if module not in triggered and any(
                        m == module and not attr.startswith("__") and attr not in imports.defines
                        and f"{module}.{attr}" not in found for m, attr in reads):
                    triggered.add(module)
                    pending.extend(imports.on_getattr)
    return found


def saepipe_stages(dvc: dict) -> dict[str, dict]:
    """dvc.yaml's stages whose command is `saepipe <subcommand>`, keyed by subcommand."""
    return {stage["cmd"].split()[1]: stage for stage in dvc["stages"].values()
            if stage["cmd"].split()[0] == "saepipe"}


@pytest.fixture(scope="module")
def dvc_stages(repo_dir: Path) -> dict[str, tuple[list[Path], set[Path]]]:
    """Per `saepipe` subcommand in dvc.yaml: its code deps (paths under src/) and its import closure's files."""
    stages = saepipe_stages(yaml.safe_load((repo_dir / "dvc.yaml").read_text()))
    assert stages, "dvc.yaml has no `saepipe <stage>` stages"
    unknown = sorted(set(stages) - set(STAGES))
    assert not unknown, f"dvc.yaml runs saepipe subcommands that saepipe.cli.STAGES lacks: {unknown}"
    return {name: ([repo_dir / dep for dep in stage.get("deps", []) if dep.startswith("src/")],
                   set(import_closure(["saepipe.cli", STAGES[name].module], repo_dir / "src").values()))
            for name, stage in stages.items()}


def covers(dep: Path, module: Path) -> bool:
    return module == dep or dep in module.parents


def test_stage_deps_cover_every_module_it_imports(dvc_stages, repo_dir: Path) -> None:
    problems = []
    for name, (deps, closure) in sorted(dvc_stages.items()):
        missing = sorted(str(m.relative_to(repo_dir)) for m in closure if not any(covers(d, m) for d in deps))
        if missing:
            problems.append(f"stage running `saepipe {name}` imports modules its deps miss; add: {', '.join(missing)}")
    assert not problems, "dvc.yaml code deps are incomplete:\n" + "\n".join(problems)


def test_stage_code_deps_exist_and_are_imported(dvc_stages, repo_dir: Path) -> None:
    """A dep on a moved or deleted file fails `dvc repro`; one the stage never imports reruns it for nothing."""
    problems = []
    for name, (deps, closure) in sorted(dvc_stages.items()):
        stale = [str(d.relative_to(repo_dir)) for d in deps if not any(covers(d, m) for m in closure)]
        if stale:
            problems.append(f"stage running `saepipe {name}` has code deps that do not exist or that it never "
                            f"imports; remove or rename: {', '.join(stale)}")
    assert not problems, "dvc.yaml has stale code deps:\n" + "\n".join(problems)


def test_stage_code_deps_are_layer_folders(dvc_stages, repo_dir: Path) -> None:
    src = repo_dir / "src" / "saepipe"
    problems = []
    for name, (deps, _) in sorted(dvc_stages.items()):
        files = [d for d in deps if d.is_file() and d.parent not in (src, src / "stages")]
        if files:
            problems.append(f"`saepipe {name}` lists modules of a layer folder one by one; list the folder: "
                            + ", ".join(str(d.relative_to(repo_dir)) for d in files))
    assert not problems, "\n".join(problems)


def write_package(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)


def test_closure_follows_lazy_relative_and_submodule_imports(tmp_path: Path) -> None:
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/stage.py": "import os\nfrom . import sibling\n\ndef run():\n    from pkg.sub.lazy import thing\n",
        "pkg/sibling.py": "from .sub import helper\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/helper.py": "from ..shared import value\n",
        "pkg/sub/lazy.py": "import pkg.leaf\n",
        "pkg/leaf.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import typing_only\n",
        "pkg/shared.py": "",
        "pkg/typing_only.py": "",
        "pkg/unused.py": "",
    })

    closure = import_closure(["pkg.stage"], tmp_path, package="pkg")

    assert set(closure) == {"pkg", "pkg.stage", "pkg.sibling", "pkg.sub", "pkg.sub.helper", "pkg.sub.lazy",
                            "pkg.leaf", "pkg.shared"}
    assert closure["pkg.sub"] == tmp_path / "pkg/sub/__init__.py"


def test_closure_follows_a_package_getattr_import_only_when_its_attribute_is_read(tmp_path: Path) -> None:
    lazy_init = "VERSION = 1\n\ndef __getattr__(name):\n    from pkg.heavy import thing\n    return thing\n"
    write_package(tmp_path, {
        "pkg/__init__.py": lazy_init,
        "pkg/heavy.py": "",
        "pkg/light.py": "import pkg\n\nprint(pkg.VERSION, pkg.__file__)\n",
        "pkg/reader.py": "import pkg as p\n\nprint(p.thing)\n",
        "pkg/importer.py": "from pkg import thing\n",
    })

    assert set(import_closure(["pkg.light"], tmp_path, package="pkg")) == {"pkg", "pkg.light"}
    for reader in ("pkg.reader", "pkg.importer"):
        assert "pkg.heavy" in import_closure([reader], tmp_path, package="pkg"), reader
