"""The package's shape (issue #26): imports go only down the layer order, with no cycle (lazy imports included), no
function-level import except an optional extra that says why, no reach into another module's private names, and the
size limits. Each rule is checked on the real tree and shown failing on a synthetic module graph."""
from __future__ import annotations

import ast
import importlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import ouroboros
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import modules of its own layer or a lower one (and never in a cycle). The order is
# written in the package docstring and README's "How it is built"; the test checks they say the same.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("ouroboros_kernels",),
    ("ouroboros.core",),
    ("ouroboros.tuning",),
    ("ouroboros.hf",),
    ("ouroboros.drafting",),
    ("ouroboros.decoding",),
    ("ouroboros.api", "ouroboros.hf_generate", "ouroboros.vllm"),
    ("ouroboros.cli",),
    ("ouroboros", "ouroboros.__main__"),
)
PROJECT = ("ouroboros", "ouroboros_kernels")
EXTENSIONS = ("ouroboros_kernels._cuda",)      # compiled modules (no source to parse; they import nothing of ours)
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_BENCH_FUNCTION_LINES = 400, 60, 100


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str          # the module imported (for ``from A import b``: A.b when that is a module, else A)
    line: int
    lazy: bool             # inside a function
    why: str               # the line's trailing comment


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of the longest prefix naming ``module`` (KeyError outside the project)."""
    best, found = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    if found is None:
        raise KeyError(module)
    return found


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT / "python") if path.is_relative_to(ROOT / "python") else path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_sources() -> dict[str, str]:
    """module name -> source, for every module of python/ouroboros and ouroboros_kernels."""
    paths = [*(ROOT / "python" / "ouroboros").rglob("*.py"), *(ROOT / "ouroboros_kernels").rglob("*.py")]
    return {module_name(p): p.read_text() for p in sorted(paths)}


def imports_of(module: str, source: str, modules: set[str]) -> list[Import]:
    """Every import of a project module in ``source`` (the module ``module``), top-level and lazy alike."""
    tree, lines = ast.parse(source), source.splitlines()
    package = module if any(m.startswith(module + ".") for m in modules) else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
            for t in targets:
                if t.split(".")[0] in PROJECT:
                    text = lines[child.lineno - 1]
                    found.append(Import(module, t, child.lineno, lazy, text.partition("#")[2].strip()))
            visit(child, inner)

    visit(tree, False)
    return found


def graph(sources: dict[str, str]) -> list[Import]:
    modules = set(sources) | set(EXTENSIONS)
    return [imp for m, src in sources.items() for imp in imports_of(m, src, modules)]


def upward(edges: list[Import]) -> list[str]:
    return [f"{e.importer}:{e.line} imports {e.imported} (layer {layer_of(e.imported)} > {layer_of(e.importer)})"
            for e in edges if layer_of(e.imported) > layer_of(e.importer)]


def cycles(edges: list[Import]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself)."""
    succ: dict[str, set[str]] = {}
    for e in edges:
        succ.setdefault(e.importer, set()).add(e.imported)
        succ.setdefault(e.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def connect(v: str) -> None:           # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in succ[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in succ[v]:
                out.append(sorted(comp))

    for v in sorted(succ):
        if v not in index:
            connect(v)
    return out


def unexplained_lazy(edges: list[Import]) -> list[str]:
    """Function-level imports of project modules; allowed only for an optional extra whose line says so."""
    return [f"{e.importer}:{e.line} imports {e.imported} inside a function" for e in edges
            if e.lazy and "optional" not in e.why.lower()]


SYNTHETIC = {
    "ouroboros.core.a": "from ouroboros_kernels import tree\n",
    "ouroboros.hf.b": "from ouroboros.core.a import x\n",
    "ouroboros_kernels": "", "ouroboros_kernels.tree": "",
}


def test_layering_rules_catch_a_synthetic_upward_import_a_cycle_and_a_lazy_import():
    clean = graph(SYNTHETIC)
    assert not upward(clean) and not cycles(clean) and not unexplained_lazy(clean)
    bad = graph({**SYNTHETIC, "ouroboros.core.a": "from ouroboros.hf.b import y\n"})
    assert upward(bad) == ["ouroboros.core.a:1 imports ouroboros.hf.b (layer 3 > 1)"]
    assert cycles(bad) == [["ouroboros.core.a", "ouroboros.hf.b"]]
    lazy = graph({**SYNTHETIC, "ouroboros.core.c": "def f():\n    from ouroboros.hf.b import y\n"})
    assert upward(lazy) and unexplained_lazy(lazy) == ["ouroboros.core.c:2 imports ouroboros.hf.b inside a function"]
    optional = graph({**SYNTHETIC, "ouroboros_kernels.x": "def f():\n    import ouroboros_kernels.tree  # optional\n"})
    assert not unexplained_lazy(optional)


def test_the_package_imports_only_downward_with_no_cycle():
    edges = graph(project_sources())
    assert len(edges) > 50
    assert upward(edges) == []
    assert cycles(edges) == []


def test_no_function_level_import_of_a_project_module_without_reason():
    assert unexplained_lazy(graph(project_sources())) == []


def test_every_function_level_import_is_an_optional_extra_that_says_why():
    """Any import inside a function, of any module, names the optional extra it waits for."""
    bad = []
    for module, src in project_sources().items():
        lines = src.splitlines()
        for fn in ast.walk(ast.parse(src)):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        comment = lines[node.lineno - 1].partition("#")[2].strip().lower()
                        if "optional" not in comment:
                            bad.append(f"{module}:{node.lineno}")
    assert sorted(set(bad)) == []


def _private_reaches(path: Path, src: str, modules: set[str]) -> list[str]:
    """``from <project module> import _name`` and ``<project module alias>._name`` in another module."""
    out, aliases = [], set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PROJECT and not node.level:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in modules:
                    aliases.add(a.asname or a.name)
                elif a.name.startswith("_") and not a.name.startswith("__"):
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PROJECT:
                    aliases.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and base.id in aliases:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {base.id}.{node.attr}")
    return out


def test_no_module_reaches_into_another_modules_private_names():
    modules = set(project_sources())
    files = [*(ROOT / "python").rglob("*.py"), *(ROOT / "ouroboros_kernels").rglob("*.py"),
             *(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]
    found = [r for p in sorted(files) for r in _private_reaches(p, p.read_text(), modules)]
    assert found == []


def _function_sizes(src: str) -> list[tuple[str, int, int]]:
    """(name, line, lines without the docstring) of every function in ``src``."""
    out = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            size = node.end_lineno - node.lineno + 1
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                size -= first.end_lineno - first.lineno + 1
            out.append((node.name, node.lineno, size))
    return out


def test_size_limits():
    too_big = []
    for path in sorted((ROOT / "python" / "ouroboros").rglob("*.py")):
        src = path.read_text()
        if len(src.splitlines()) > MAX_MODULE_LINES:
            too_big.append(f"{path.relative_to(ROOT)}: {len(src.splitlines())} lines")
        too_big += [f"{path.relative_to(ROOT)}:{line} {name}: {n} lines" for name, line, n in _function_sizes(src)
                    if n > MAX_FUNCTION_LINES]
    for path in sorted((ROOT / "bench").rglob("*.py")):
        too_big += [f"{path.relative_to(ROOT)}:{line} {name}: {n} lines"
                    for name, line, n in _function_sizes(path.read_text()) if n > MAX_BENCH_FUNCTION_LINES]
    assert too_big == []


def test_size_check_counts_a_long_function_without_its_docstring():
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    assert _function_sizes(f'def f():\n    """doc\n    more"""\n{body}\n')[0][2] == 62


@pytest.mark.parametrize("where", ["package docstring", "README"])
def test_the_layer_order_is_written_where_a_reader_looks(where):
    text = ouroboros.__doc__ if where == "package docstring" else (ROOT / "README.md").read_text()
    positions = []
    for prefixes in LAYERS[:-1]:
        short = prefixes[0].removeprefix("ouroboros.") if prefixes[0] != "ouroboros_kernels" else prefixes[0]
        match = re.search(rf"`{re.escape(short)}/?`", text)
        assert match, f"the {where} does not name layer {short}"
        positions.append(match.start())
    assert positions == sorted(positions), f"the {where} lists the layers out of order"


def test_the_public_names_readme_promises_are_exported():
    for name in ("generate", "stream", "custom_generate", "patch", "unpatch", "PhrasePool", "GpuPhrasePool",
                 "DecodeConfig", "SamplingConfig", "quantize_draft", "TESTED_MODEL_TYPES", "load_pair",
                 "revert_fused_glue"):
        assert name in ouroboros.__all__ and hasattr(ouroboros, name), name
    assert not [n for n in ouroboros.__all__ if n.startswith("_")]


def test_no_package_attribute_hides_a_submodule():
    """``import ouroboros.x.y as m`` must give the module: no package exports a name equal to one of its modules
    (the old ``ouroboros.patch`` was both the function and the module)."""
    clashes = []
    for module in project_sources():
        package, _, leaf = module.rpartition(".")
        if package and leaf and hasattr(importlib.import_module(package), leaf):
            if not inspect.ismodule(getattr(importlib.import_module(package), leaf)):
                clashes.append(module)
    assert clashes == []
