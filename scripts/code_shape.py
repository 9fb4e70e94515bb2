"""Print code-shape figures: package import edges, long modules, function-local imports, function lengths.

    python scripts/code_shape.py [ROOT]

The import-edge table counts imports between the coarse package groups (function-local ones included);
``--layers`` groups by the layers of ``docs/layers.md`` instead. Only the standard library is used, so it runs
on any checkout, also one from before the layers existed.
"""

from __future__ import annotations

import argparse
import ast
import collections
import statistics
from pathlib import Path

PKGS = ("pipelines", "xsam_model", "orchestrate")
PIPELINE_PARTS = ("sources", "build", "loader", "inspect")


def group(module: str) -> str:
    """The coarse group of a project module (the figures before and after the layers use this)."""
    p = module.split(".")
    if p[0] == "pipelines":
        if len(p) > 1 and p[1] in PIPELINE_PARTS:
            return "pipelines." + p[1]
        if len(p) > 1 and p[1] in ("demo_data", "demo"):
            return "pipelines.demo"
        return "pipelines(core)"
    if p[0] == "orchestrate":
        return "orchestrate.evaluation" if len(p) > 1 and p[1] == "evaluation" else "orchestrate"
    return p[0]


def module_name(root: Path, f: Path) -> str:
    parts = f.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.Import | ast.ImportFrom, module: str, is_init: bool) -> list[str]:
    """Absolute names an import statement imports (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not node.level:
        return [node.module or ""]
    base = module.split(".") if is_init else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return [".".join(base + ([node.module] if node.module else []))]


def scan(root: Path, layer_of=group):
    """``(edges, local_by_file, heavy_local_by_file, function_lengths, long_modules)``."""
    edges: collections.Counter = collections.Counter()
    local_by: collections.Counter = collections.Counter()
    funcs: list[int] = []
    big: list[tuple[int, str]] = []
    for pkg in PKGS:
        for f in sorted((root / pkg).rglob("*.py")):
            mod, rel = module_name(root, f), str(f.relative_to(root))
            src = f.read_text()
            if src.count("\n") > 500:
                big.append((src.count("\n"), rel))

            def walk(node: ast.AST, inside: bool, mod=mod, rel=rel, is_init=f.name == "__init__.py") -> None:
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                        funcs.append(child.end_lineno - child.lineno + 1)
                    if isinstance(child, ast.Import | ast.ImportFrom):
                        if inside:
                            local_by[rel] += 1
                        for m in imported(child, mod, is_init):
                            if m.split(".")[0] in PKGS and layer_of(mod) != layer_of(m):
                                edges[(layer_of(mod), layer_of(m))] += 1
                    walk(child, inside or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

            walk(ast.parse(src), False)
    return edges, local_by, funcs, big


def docs_layers(root: Path):
    """A ``module -> layer`` function from ``docs/layers.md``'s table (longest prefix wins)."""
    prefixes: list[tuple[str, str]] = []
    for line in (root / "docs" / "layers.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and "`" in cells[1]:
            prefixes += [(p.strip("` "), cells[0]) for p in cells[1].split(",")]
    prefixes.sort(key=lambda x: -len(x[0]))

    def layer(module: str) -> str:
        return next((n for p, n in prefixes if module == p or module.startswith(p + ".")), module)

    return layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default=".")
    ap.add_argument("--layers", action="store_true", help="group edges by the layers of docs/layers.md")
    args = ap.parse_args()
    root = Path(args.root)
    edges, local_by, funcs, big = scan(root, docs_layers(root) if args.layers else group)
    print("import edges (from -> to: count)")
    for (a, b), c in sorted(edges.items()):
        print(f"  {a:24s} -> {b:24s} {c}")
    print("cycles:", sorted({tuple(sorted((a, b))) for (a, b) in edges if (b, a) in edges}))
    print("modules over 500 lines:", len(big))
    for n, p in sorted(big, reverse=True):
        print("  ", n, p)
    print("function-local imports:", sum(local_by.values()), "top:", local_by.most_common(5))
    funcs.sort()
    print("functions:", len(funcs), "median", statistics.median(funcs), "p90", funcs[int(0.9 * len(funcs))])


if __name__ == "__main__":
    main()
