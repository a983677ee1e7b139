"""Before/Expected for passes: a graph compared with the code a reader expects, up to value names.

A golden test writes the graph it expects as the ``forward`` that ``torch.fx`` prints for it, and
``assert_graph`` compares a pass's output with it node for node: the same operations on the same
targets (layers, functions, methods), each argument wired to the same earlier value, in the same
order. Only the names of values are free. fx picks node names itself (``add_1`` when an ``add``
exists, a stage's inputs named after whatever crossed the cut), and a pass that renames nothing
should not fail a test over them. ``self.<path>`` targets are compared as written: which layer a node
calls is the point of most rewrites.

fx prints ``x = None`` after a value's last use; those lines follow from the wiring and are ignored,
so the expected code may leave them out.
"""

from __future__ import annotations

import ast
import difflib
import textwrap
from typing import Any

import torch
import torch.fx as fx

from gradxform.compiler import prepare
from gradxform.frontend.loader import LoadedModel
from gradxform.passes import resolve_pipeline
from gradxform.passes.manager import PassContext, PassManager, PassRecord


def before(model: torch.nn.Module, *args: Any, tracer: str = "fx") -> tuple[fx.GraphModule, PassContext]:
    """``model`` traced as ``gradxform compile`` traces it (metadata, block tags), and its context."""
    gm, used, _, _ = prepare(LoadedModel(model, args), tracer)
    assert used == tracer, f"traced with {used}, not {tracer}"
    return gm, PassContext(args)


def run(gm: Any, ctx: PassContext, pipeline: str) -> tuple[Any, list[PassRecord]]:
    """Pipeline text through the PassManager (it lints, and compares outputs for preserving passes)."""
    return PassManager(resolve_pipeline(pipeline), pipeline).run(gm, ctx)


def forward_code(gm: fx.GraphModule) -> str:
    """``gm``'s forward as fx prints it, without the ``x = None`` lines: what a golden test writes."""
    return ast.unparse(_forward(gm.code, frees=False))


def called_layers(gm: fx.GraphModule) -> dict[str, type]:
    """The type of each layer a ``call_module`` node calls, by target."""
    return {str(n.target): type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}


def assert_graph(gm: fx.GraphModule, expected: str, layers: dict[str, type] | None = None) -> None:
    """``gm`` computes what ``expected`` (a ``def forward``) writes, up to value names.

    ``layers``, when given, must name the type of every layer the graph calls: the code alone does not
    say whether ``self.fc`` is still an ``nn.Linear`` or a layer a pass put in its place.
    """
    want, got = _canonical(expected), _canonical(gm.code)
    if want != got:
        shown = textwrap.dedent(expected).strip()
        diff = "\n".join(difflib.unified_diff(want.splitlines(), got.splitlines(), "expected", "actual",
                                              lineterm="", n=1))
        raise AssertionError(f"the graph differs from the expected one (value names aside)\n"
                             f"expected:\n{textwrap.indent(shown, '  ')}\n"
                             f"actual:\n{textwrap.indent(forward_code(gm), '  ')}\n"
                             f"difference, values numbered in order of definition:\n{diff}")
    if layers is not None:
        actual = called_layers(gm)
        if actual != layers:
            show = lambda d: {k: v.__name__ for k, v in d.items()}  # noqa: E731
            raise AssertionError(f"called layers differ: expected {show(layers)}, got {show(actual)}")


def assert_tree(module: torch.nn.Module, expected: str) -> None:
    """``module``'s printed tree (layer types, shapes, extra_repr) equals ``expected``."""
    got = "\n".join(line for line in repr(module).splitlines() if not line.startswith("# To see more"))
    want = textwrap.dedent(expected).strip()
    if got.strip() != want:
        diff = "\n".join(difflib.unified_diff(want.splitlines(), got.strip().splitlines(), "expected", "actual",
                                              lineterm=""))
        raise AssertionError(f"module tree differs:\n{diff}")


def _forward(src: str, frees: bool) -> ast.FunctionDef:
    tree = ast.parse(textwrap.dedent(src))
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "forward"), None)
    if fn is None:
        raise ValueError("expected code must hold a 'def forward(self, ...)'")
    if not frees:
        fn.body = [s for s in fn.body if not _is_free(s)] or [ast.Pass()]
    return fn


def _is_free(stmt: ast.stmt) -> bool:
    """fx's ``a = b = None`` after a value's last use."""
    return (isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant) and stmt.value.value is None
            and all(isinstance(t, ast.Name) for t in stmt.targets))


def _canonical(src: str) -> str:
    """The forward with inputs and values renamed ``v0, v1, ...`` in order of definition."""
    fn = _forward(src, frees=False)
    names: dict[str, str] = {}
    args = fn.args
    for a in [*args.posonlyargs, *args.args[1:], *([args.vararg] if args.vararg else []), *args.kwonlyargs,
              *([args.kwarg] if args.kwarg else [])]:
        names[a.arg] = a.arg = f"v{len(names)}"
    for stmt in fn.body:
        for target in getattr(stmt, "targets", []):
            for n in ast.walk(target):
                if isinstance(n, ast.Name) and n.id not in names:
                    names[n.id] = f"v{len(names)}"

    class Rename(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.Name:
            node.id = names.get(node.id, node.id)
            return node

    fn.body = [Rename().visit(s) for s in fn.body]
    return "\n".join([f"def forward({ast.unparse(fn.args)}):", *(ast.unparse(s) for s in fn.body)])
