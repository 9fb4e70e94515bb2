"""The layers of docs/layers.md hold: every import of every module is an allowed edge, the layers have no
cycle, and function-local imports only defer heavy packages (each module saying so in one comment).

The table is parsed from docs/layers.md itself, so the page and this test cannot drift apart.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "xsam_model", "orchestrate")
LAYERS_DOC = ROOT / "docs" / "layers.md"

# Packages whose import costs a second or pulls in torch (docs/layers.md, "Function-local imports").
HEAVY = frozenset(
    {
        "torch",
        "ray",
        "deepspeed",
        "transformers",
        "tokenizers",
        "wandb",
        "pycocoevalcap",
        "datasets",
        "s3fs",
        "moto",
        "webdataset",
        "scipy",
    }
)

# Edges allowed outside the table while a move is under way: (importing layer, imported module), the exact
# module, so that no other import into that layer slips through. Empty: every edge follows the table.
PENDING_EDGES: set[tuple[str, str]] = set()
# Modules exempt from the function-local import rule while they are rewritten. Empty: the rule holds
# everywhere.
PENDING_LOCAL_IMPORTS: set[str] = set()
PENDING_LOCAL_DIRS: tuple[str, ...] = ()

HEAVY_COMMENT = re.compile(r"^# Heavy imports \(([^)]*)\)", re.MULTILINE)


# ---------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Layer:
    name: str
    prefixes: tuple[str, ...]
    layers: frozenset[str]  # layers it may import
    modules: tuple[str, ...]  # single modules it may import (with their submodules)


def parse_table(text: str) -> dict[str, Layer]:
    """The ``| layer | modules | may import |`` table of docs/layers.md, one :class:`Layer` per row."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert rows and [c.strip() for c in rows[0].strip("|").split("|")] == ["layer", "modules", "may import"]
    names = [r.strip("|").split("|")[0].strip() for r in rows[2:]]
    table = {}
    for row in rows[2:]:
        name, modules, may = (c.strip() for c in row.strip("|").split("|"))
        prefixes = tuple(re.findall(r"`([\w.]+)`", modules))
        allowed = set(names) if may == "everything" else set()
        if may not in ("—", "everything"):
            words = re.sub(r"`[\w.]+`", "", may).replace(",", " ").split()
            unknown = set(words) - set(names)
            assert not unknown, f"docs/layers.md: {name} may import unknown layers {sorted(unknown)}"
            allowed = set(words)
        mods = tuple(re.findall(r"`([\w.]+)`", may))
        table[name] = Layer(name, prefixes, frozenset(allowed - {name}), mods)
    return table


def layer_of(module: str, table: dict[str, Layer]) -> str | None:
    """The layer of a project module (the longest matching prefix), None for a module outside the project."""
    best, best_len = None, -1
    for layer in table.values():
        for p in layer.prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = layer.name, len(p)
    return best


def allowed(src_layer: str, target: str, table: dict[str, Layer]) -> bool:
    dst = layer_of(target, table)
    if dst is None or dst == src_layer or dst in table[src_layer].layers:
        return True
    if any(target == m or target.startswith(m + ".") for m in table[src_layer].modules):
        return True
    return (src_layer, target) in PENDING_EDGES


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


# ---------------------------------------------------------------------------------------------- imports
@dataclass(frozen=True)
class Import:
    line: int
    module: str  # absolute, dotted; for ``from a import b`` the submodule ``a.b`` when it is one
    local: bool  # inside a function
    type_only: bool  # under ``if TYPE_CHECKING:`` (never executed)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the packages, ``{dotted name: file}`` (a package is its ``__init__.py``)."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith("TYPE_CHECKING")


def _dynamic_import(node: ast.AST) -> str | None:
    """The literal module of ``importlib.import_module("m")`` / ``__import__("m")``."""
    if not isinstance(node, ast.Call) or not node.args or not isinstance(node.args[0], ast.Constant):
        return None
    if ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__"):
        return node.args[0].value if isinstance(node.args[0].value, str) else None
    return None


def parse_imports(source: str, module: str, is_package: bool, known: set[str]) -> list[Import]:
    """Every import in ``source`` (the module ``module``), with relative imports resolved."""
    out: list[Import] = []
    base = module.split(".") if is_package else module.split(".")[:-1]

    def targets(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom):
            pkg = node.module or ""
            if node.level:
                up = base[: len(base) - (node.level - 1)]
                pkg = ".".join(up + ([node.module] if node.module else []))
            return [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in known else pkg for a in node.names]
        name = _dynamic_import(node)
        return [name] if name else []

    def walk(node: ast.AST, local: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            for name in targets(child):
                out.append(Import(child.lineno, name, local, type_only))
            walk(
                child,
                local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda),
                type_only or _is_type_checking(child),
            )

    walk(ast.parse(source), False, False)
    return out


def _all_imports(root: Path = ROOT) -> dict[str, tuple[Path, list[Import]]]:
    mods = project_modules(root)
    known = set(mods)
    return {m: (f, parse_imports(f.read_text(), m, f.name == "__init__.py", known)) for m, f in mods.items()}


def bad_edges(imports: dict[str, tuple[Path, list[Import]]], table: dict[str, Layer]) -> list[str]:
    """``file:line: src-layer -> dst-layer (module)`` for each import outside the table."""
    out = []
    for module, (path, found) in sorted(imports.items()):
        src = layer_of(module, table)
        assert src is not None, f"{module}: in no layer of docs/layers.md"
        for imp in found:
            if not allowed(src, imp.module, table):
                rel = path.relative_to(ROOT) if path.is_absolute() else path
                out.append(f"{rel}:{imp.line}: {src} -> {layer_of(imp.module, table)} ({imp.module})")
    return out


# ---------------------------------------------------------------------------------------------- heavy imports
def module_level_heavy(imports: dict[str, tuple[Path, list[Import]]]) -> dict[str, set[str]]:
    """``{module: heavy packages loaded by importing it}``: the closure of its executed module-level imports
    (parent packages included, as Python imports them first)."""
    direct: dict[str, set[str]] = {}
    for module, (_, found) in imports.items():
        deps = set()
        for imp in found:
            if imp.local or imp.type_only:
                continue
            parts = imp.module.split(".")
            deps.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        parts = module.split(".")
        deps.update(".".join(parts[:i]) for i in range(1, len(parts)))
        direct[module] = deps
    memo: dict[str, set[str]] = {}

    def heavy(module: str, seen: frozenset[str]) -> set[str]:
        if module in memo:
            return memo[module]
        out = set()
        for dep in direct.get(module, ()):
            top = dep.split(".")[0]
            if top in HEAVY:
                out.add(top)
            elif dep in direct and dep not in seen:
                out |= heavy(dep, seen | {dep})
        if not seen - {module}:
            memo[module] = out
        return out

    return {m: heavy(m, frozenset({m})) for m in direct}


def local_import_problems(
    module: str, path: Path, source: str, found: list[Import], heavy_of: dict[str, set[str]]
) -> list[str]:
    """What breaks the function-local import rule in one module (docs/layers.md)."""
    rel = path.relative_to(ROOT) if path.is_absolute() else path
    comments = HEAVY_COMMENT.findall(source)
    named = {w.strip() for c in comments for w in c.split(",")}
    already = heavy_of.get(module, set())
    out: list[str] = []
    for imp in (i for i in found if i.local and not i.type_only):
        top = imp.module.split(".")[0]
        defers = {top} if top in HEAVY else set(heavy_of.get(imp.module, set()))
        defers -= already
        if not defers:
            out.append(
                f"{rel}:{imp.line}: function-local import of {imp.module} defers nothing heavy: hoist it"
            )
        elif not defers & named:
            out.append(
                f"{rel}:{imp.line}: {imp.module} defers {sorted(defers)}: name it in '# Heavy imports (…)'"
            )
    out = list(dict.fromkeys(out))  # ``from m import a, b`` is one import
    if any(i.local for i in found) and len(comments) != 1:
        out.append(f"{rel}: {len(comments)} '# Heavy imports (…)' comment lines at module level, want 1")
    return out


def _pending_local(path: Path) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return rel in PENDING_LOCAL_IMPORTS or rel.startswith(PENDING_LOCAL_DIRS)


# ---------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def table() -> dict[str, Layer]:
    return parse_table(LAYERS_DOC.read_text())


@pytest.fixture(scope="module")
def imports() -> dict[str, tuple[Path, list[Import]]]:
    return _all_imports()


def test_every_import_is_an_allowed_edge(table, imports):
    bad = bad_edges(imports, table)
    assert not bad, "imports outside docs/layers.md:\n" + "\n".join(bad)


def test_layers_have_no_cycle(table, imports):
    declared = {name: set(layer.layers) for name, layer in table.items()}
    assert cycle(declared) is None, f"docs/layers.md allows a cycle: {cycle(declared)}"
    actual: dict[str, set[str]] = {}
    for module, (_, found) in imports.items():
        src = layer_of(module, table)
        for imp in found:
            dst = layer_of(imp.module, table)
            if dst and dst != src and (src, imp.module) not in PENDING_EDGES:
                actual.setdefault(src, set()).add(dst)
    assert cycle(actual) is None, f"layer cycle in the imports: {cycle(actual)}"


def test_every_module_is_in_a_layer(table):
    assert [m for m in project_modules() if layer_of(m, table) is None] == []


def test_function_local_imports_defer_heavy_packages_and_say_so(imports):
    heavy_of = module_level_heavy(imports)
    problems = []
    for module, (path, found) in sorted(imports.items()):
        if not _pending_local(path):
            problems += local_import_problems(module, path, path.read_text(), found, heavy_of)
    assert not problems, "\n".join(problems)


def test_pending_entries_are_still_needed(table, imports):
    """A pending edge that no import uses any more must be deleted, so the list only shrinks."""
    used = {(layer_of(m, table), i.module) for m, (_, found) in imports.items() for i in found}
    stale = sorted(e for e in PENDING_EDGES if e not in used)
    assert not stale, f"PENDING_EDGES no longer needed, remove: {stale}"
    paths = {p.relative_to(ROOT).as_posix() for p, _ in imports.values()}
    assert not PENDING_LOCAL_IMPORTS - paths, (
        f"PENDING_LOCAL_IMPORTS of gone files: {PENDING_LOCAL_IMPORTS - paths}"
    )


# ------------------------------------------------------------------------ the checks catch what they should
SYNTHETIC_TABLE = """
| layer | modules | may import |
|---|---|---|
| core | `pipelines` | — |
| sources | `pipelines.sources` | core |
| build | `pipelines.build` | core, sources |
| model | `xsam_model` | `pipelines.schema` |
| orchestrate | `orchestrate` | everything |
"""
KNOWN = {"pipelines", "pipelines.schema", "pipelines.masks", "pipelines.build", "pipelines.build.driver"}


def _edges(source: str, module: str, is_package: bool = False) -> list[str]:
    found = parse_imports(source, module, is_package, KNOWN)
    return bad_edges({module: (Path(module.replace(".", "/") + ".py"), found)}, parse_table(SYNTHETIC_TABLE))


def test_a_bad_edge_fails_wherever_the_import_hides():
    assert _edges("from pipelines.build import driver\n", "pipelines.sources.x") == [
        "pipelines/sources/x.py:1: sources -> build (pipelines.build.driver)"
    ]
    local = "def f():\n    from ..build.driver import run\n"  # function-local and relative
    assert _edges(local, "pipelines.sources.x") == [
        "pipelines/sources/x.py:2: sources -> build (pipelines.build.driver)"
    ]
    dynamic = "import importlib\ndef f():\n    return importlib.import_module('pipelines.build.driver')\n"
    assert _edges(dynamic, "pipelines.sources.x") == [
        "pipelines/sources/x.py:3: sources -> build (pipelines.build.driver)"
    ]
    assert _edges("from . import schema\n", "pipelines", is_package=True) == []  # a layer imports itself
    assert _edges("from . import build\n", "pipelines", is_package=True) == [
        "pipelines.py:1: core -> build (pipelines.build)"
    ]
    assert _edges("from pipelines.build import driver\n", "pipelines.build.x") == []


def test_the_model_imports_only_the_listed_core_modules():
    assert _edges("from pipelines.schema import Sample\n", "xsam_model.x") == []
    assert _edges("from pipelines import masks\n", "xsam_model.x") == [
        "xsam_model/x.py:1: model -> core (pipelines.masks)"
    ]
    assert _edges("import orchestrate.trainer\nimport pipelines.build\n", "orchestrate.x") == []


def test_a_declared_cycle_is_found():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    looped = SYNTHETIC_TABLE.replace("| core | `pipelines` | — |", "| core | `pipelines` | build |")
    declared = {n: set(layer.layers) for n, layer in parse_table(looped).items()}
    assert cycle(declared) == ["build", "core", "build"]


def test_local_import_rule_on_synthetic_modules():
    def problems(source: str, heavy_of: dict[str, set[str]] | None = None) -> list[str]:
        found = parse_imports(source, "pipelines.x", False, KNOWN)
        return local_import_problems("pipelines.x", Path("pipelines/x.py"), source, found, heavy_of or {})

    light = "def f():\n    import json\n    from pipelines import masks\n"
    assert problems(light) == [
        "pipelines/x.py:2: function-local import of json defers nothing heavy: hoist it",
        "pipelines/x.py:3: function-local import of pipelines.masks defers nothing heavy: hoist it",
        "pipelines/x.py: 0 '# Heavy imports (…)' comment lines at module level, want 1",
    ]
    uncommented = "def f():\n    import torch\n"
    assert (
        problems(uncommented)[0]
        == "pipelines/x.py:2: torch defers ['torch']: name it in '# Heavy imports (…)'"
    )
    commented = "# Heavy imports (torch) are deferred into f: the CLI's --help stays light.\n" + uncommented
    assert problems(commented) == []
    via_project = commented.replace("import torch", "from pipelines.build import driver")
    assert problems(via_project, {"pipelines.build.driver": {"torch"}}) == []
    already = commented.replace(
        "def f", "import torch\n\n\ndef f"
    )  # torch is loaded anyway: nothing deferred
    assert "defers nothing heavy" in problems(already, {"pipelines.x": {"torch"}})[0]


# Entry points and light modules, and the heavy packages importing each may load (hoisting an import must not
# add one: `--help` of the CLIs and the data-only tools stay quick).
LIGHT_MODULES = {
    "pipelines.schema": set(),
    "pipelines.sources": set(),
    "pipelines.loader": set(),
    "pipelines.demo_data": set(),
    "pipelines.inspect.cards": set(),
    "pipelines.inspect.preview": set(),
    "pipelines.build.mixture_weights": set(),
    "orchestrate.build_shards": {"ray"},
    "orchestrate.evaluate": set(),
    "orchestrate.predict": set(),
    "orchestrate.callbacks": set(),
    "orchestrate.eval_callback": set(),
    "orchestrate.tracking": set(),
}


@pytest.mark.parametrize("module", sorted(LIGHT_MODULES))
def test_light_modules_stay_light(module):
    code = f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    loaded = set(out.stdout.split()) & HEAVY
    assert loaded <= LIGHT_MODULES[module], (
        f"importing {module} loads {sorted(loaded - LIGHT_MODULES[module])}"
    )
