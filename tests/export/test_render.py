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
    # each later stage opens with a note of the tensors it receives (name and shape), fed by a dashed
    # edge from the stage that produced them; the stages' columns are kept in order
    received = next(line for line in dot.splitlines() if line.strip().startswith("s1_received ["))
    cut = module.gx_report["passes"][0]["info"]["cuts"][0]
    assert "from stage 0" in received and f"{cut}: B×" in received and "shape=note" in received
    assert any(line.strip().startswith(f"s0_{cut} -> s1_received [style=dashed") for line in dot.splitlines())
    assert "s1_layer" in dot and "input layer" not in dot
    order = [line.split("->")[1].split("[")[0].strip() for line in dot.splitlines()
             if line.strip().startswith("columns ->")]
    assert order == ["legend", "s0_x", "s1_received", "s2_received"]
    assert "legend [shape=plaintext" in dot and "projection skip" in dot


def test_a_graph_alone_has_a_legend_and_no_stage_columns():
    module = compile_loaded(example("resnet.py"), "reversible", check=False).module
    dot = to_dot(module)
    assert "legend [shape=plaintext" in dot and "cluster_stage" not in dot and "columns" not in dot


def test_svg_is_written(tmp_path):
    module = compile_loaded(example("mlp.py"), "split{stages=2}", check=False).module
    path = render(module, tmp_path / "out" / "g.svg", "mlp")  # a folder not yet made, as in the README
    text = path.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text and "stage 1" in text
