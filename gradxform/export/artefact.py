"""Compiled artefacts: a folder from which ``gradxform.load`` rebuilds the transformed model.

What is stored:

- ``manifest.json``: format version, the recorded recipe (model file, attribute, tracer, pipeline),
  and the SHA-256 of the copied model source;
- ``source/<file>.py``: a copy of the model file;
- ``original.pt``: the model's weights before any pass, ``inputs.pt``: the example inputs,
  ``weights.pt``: the transformed model's weights (all plain tensor dicts);
- ``code/*.py``: the generated code of each graph, for people to read (never executed).

What loading trusts: ``load`` imports ``source/<file>.py`` -- Python code, as trusted as any model
file you import -- and checks it against the manifest's hash. Tensor files are read with
``torch.load(weights_only=True)``, which cannot run code. The transformed model is rebuilt by
re-running the recorded trace and pipeline on the original weights (passes are deterministic), then
the saved weights are loaded into it, so the artefact holds no pickled code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ExportError

FORMAT = 1


@dataclass
class Recipe:
    """How to rebuild a compiled model: its file, attribute, inputs, tracer and pipeline."""

    source: Path | None
    attr: str | None
    args: tuple
    kwargs: dict
    tracer: str
    pipeline: str
    original_state: dict[str, torch.Tensor] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _stages(module: Any) -> list:
    from ..nn.staged import stages_of

    return stages_of(module) or []


def _code_of(module: Any) -> dict[str, str]:
    stages = _stages(module)
    if stages:
        return {f"stage{i}.py": s.code for i, s in enumerate(stages)}
    return {"model.py": getattr(module, "code", "")}


def save(module: Any, folder: str | Path, recipe: Recipe | None = None) -> Path:
    """Write ``module`` (from ``gradxform.compile``) to ``folder`` so that ``load`` can rebuild it."""
    recipe = recipe or getattr(module, "gx_recipe", None)
    if recipe is None or recipe.source is None:
        raise ExportError("gradxform.save needs to know how to rebuild the model from source",
                          hint="compile from a model file: gradxform.compile('model.py:build_model', ...)")
    folder = Path(folder)
    (folder / "source").mkdir(parents=True, exist_ok=True)
    (folder / "code").mkdir(exist_ok=True)
    src_copy = folder / "source" / recipe.source.name
    if recipe.source.resolve() != src_copy.resolve():
        shutil.copyfile(recipe.source, src_copy)
    _atomic_save(recipe.original_state, folder / "original.pt")
    _atomic_save({"args": list(recipe.args), "kwargs": dict(recipe.kwargs)}, folder / "inputs.pt")
    _atomic_save({k: v.detach() for k, v in module.state_dict().items()}, folder / "weights.pt")
    for name, code in _code_of(module).items():
        (folder / "code" / name).write_text(code)
    manifest = {
        "format": FORMAT,
        "torch": torch.__version__,
        "source": f"source/{recipe.source.name}",
        "source_sha256": _sha256(src_copy),
        "attr": recipe.attr,
        "tracer": recipe.tracer,
        "pipeline": recipe.pipeline,
        "stages": len(_stages(module)) or None,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "manifest.json"
    if not path.exists():
        raise ExportError(f"{folder} is not a gradxform artefact (no manifest.json)",
                          hint="create one with: gradxform compile MODEL.py --pass ... -o DIR")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{path} has format {manifest.get('format')}, this gradxform reads {FORMAT}")
    return manifest


def load(folder: str | Path, verify_source: bool = True) -> Any:
    """Rebuild the transformed model saved in ``folder``; see the module docstring for what it trusts."""
    from ..compiler import compile_loaded
    from ..frontend.loader import LoadedModel, find_model, import_file

    folder = Path(folder)
    manifest = read_manifest(folder)
    source = folder / manifest["source"]
    if verify_source and _sha256(source) != manifest["source_sha256"]:
        raise ExportError(f"{source} differs from the file the artefact was compiled from",
                          hint="recompile, or call load(..., verify_source=False) if the change is intended")
    module = import_file(source)
    model, attr = find_model(module, source, manifest["attr"])
    model.load_state_dict(torch.load(folder / "original.pt", weights_only=True))
    inputs = torch.load(folder / "inputs.pt", weights_only=True)
    loaded = LoadedModel(model, tuple(inputs["args"]), dict(inputs["kwargs"]), path=source, attr=attr)
    result = compile_loaded(loaded, manifest["pipeline"], tracer=manifest["tracer"], check=False)
    result.module.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
    return result.module
