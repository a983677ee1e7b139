"""The package's layers hold: imports go one way, no import cycles, the listings stay torch-free.

Every ``import`` in the package is read from the source (function-local ones too: a lazy import hides
a cycle, it does not remove it); only imports under ``if TYPE_CHECKING:`` are left out, since they
never run. Importing ``a.b.c`` also runs ``a.b``'s ``__init__``, so that edge counts as well, unless
``a.b`` is a package the importer is itself part of (it is initialised first) or the root package (a
lazy facade over :mod:`gradxform.api`).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gradxform"

# Lowest first. A module may import its own layer and those below. ``ir`` is below ``frontend``: the
# tracers write the IR's metadata.
LAYERS: list[set[str]] = [
    {"errors", "options", "state"},
    {"ir"},
    {"frontend", "autodiff"},
    {"nn"},
    {"passes"},
    {"compiler"},
    {"export", "runtime"},
    {"api"},
    {""},                      # the root package: a lazy facade over api
    {"search"},                # trials train through api
    {"cli", "__main__"},
]
# Packages that share a layer and must not know each other.
INDEPENDENT = [{"frontend", "autodiff"}, {"export", "runtime"}]


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The gradxform modules ``name`` imports, explicitly or through a parent package."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        for t in targets:
            if not t.startswith("gradxform"):
                continue
            parts = t.split(".")
            for k in range(2, len(parts) + 1):  # a.b.c runs a.b first (the root package excepted)
                prefix = ".".join(parts[:k])
                if k == len(parts) or not (name == prefix or name.startswith(prefix + ".")):
                    found.add(prefix)  # an ancestor of the importer is already initialised: no edge
            if t == "gradxform":
                found.add(t)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS")


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_imports_go_one_way():
    wrong = []
    for name, deps in graph().items():
        for dep in deps:
            a, b = layer_of(name), layer_of(dep)
            pair = {name.split(".")[1], dep.split(".")[1]} if "." in name and "." in dep else set()
            if b > a or (len(pair) == 2 and any(pair <= group for group in INDEPENDENT)):
                wrong.append(f"{name} -> {dep}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_passes_and_nn_never_import_the_runtime():
    for name, deps in graph().items():
        if name.startswith(("gradxform.passes", "gradxform.nn", "gradxform.autodiff")):
            assert not [d for d in deps if d.startswith("gradxform.runtime")], name


def test_no_import_cycles():
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_a_cycle_and_a_layer_violation(tmp_path, monkeypatch):
    """The checks above can fail: a hand-made package with both faults is caught."""
    pkg = tmp_path / "gradxform"
    (pkg / "nn").mkdir(parents=True)
    (pkg / "runtime").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nn" / "__init__.py").write_text("")
    (pkg / "runtime" / "__init__.py").write_text("")
    (pkg / "nn" / "a.py").write_text("def f():\n    from ..runtime import b\n")
    (pkg / "runtime" / "b.py").write_text("from ..nn.a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    with pytest.raises(AssertionError, match="gradxform.nn.a -> gradxform.runtime"):
        test_imports_go_one_way()
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycles()


@pytest.mark.parametrize("args", [["passes"], ["passes", "petra"], ["--help"], ["--version"]])
def test_listings_never_import_torch(args):
    code = ("import sys\nfrom gradxform.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
