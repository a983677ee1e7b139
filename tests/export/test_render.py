"""DOT/SVG pictures: clusters per stage and per block, colours by role."""

from __future__ import annotations

from gradxform.compiler import compile_loaded
from gradxform.export.render import ROLE_COLOURS, render, to_dot

from ..conftest import example


def test_dot_has_stage_and_block_clusters_and_role_colours():
    module = compile_loaded(example("resnet.py"), "split{stages=3}", check=False).module
    dot = to_dot(module, "title")
    assert dot.count("subgraph cluster_stage") == 3
    assert 'label="layer1.0"' in dot and 'label="layer4.1"' in dot
    for role in ("stem", "block", "skip", "head"):
        assert ROLE_COLOURS[role] in dot
    # stage boundaries are drawn as edges between clusters, not as extra input nodes
    assert "s1_layer" in dot and "input layer" not in dot


def test_svg_is_written(tmp_path):
    module = compile_loaded(example("mlp.py"), "split{stages=2}", check=False).module
    path = render(module, tmp_path / "g.svg", "mlp")
    text = path.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text and "stage 1" in text
