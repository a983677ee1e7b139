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
from pathlib import Path
from typing import Any

import torch

from ..compiler import Recipe, compile_loaded
from ..errors import ExportError
from ..frontend.loader import LoadedModel, find_model, import_file
from ..nn.staged import StagedModule

FORMAT = 1


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _code_of(module: Any) -> dict[str, str]:
    if isinstance(module, StagedModule):
        return {f"stage{i}.py": s.code for i, s in enumerate(module.stages)}
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
        "schedule": recipe.schedule,
        "stages": len(module.stages) if isinstance(module, StagedModule) else None,
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
    folder = Path(folder)
    manifest = read_manifest(folder)
    loaded = original(folder, verify_source)
    result = compile_loaded(loaded, manifest["pipeline"], tracer=manifest["tracer"], check=False)
    _load_into(result.module, folder / "weights.pt")
    return result.module


def original(folder: str | Path, verify_source: bool = True) -> LoadedModel:
    """The model the artefact in ``folder`` was compiled from, before any pass, with its example inputs."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    source = (folder / str(manifest.get("source", ""))).resolve()
    if not source.is_relative_to(folder.resolve()) or not source.is_file():
        raise ExportError(f"{folder / 'manifest.json'}: its source {manifest.get('source')!r} is not a file inside "
                          f"the artefact folder", hint="an artefact imports only the copy of the model file it holds; "
                                                       "recompile with 'gradxform compile'")
    if verify_source and _sha256(source) != manifest["source_sha256"]:
        raise ExportError(f"{source} differs from the file the artefact was compiled from",
                          hint="recompile, or call load(..., verify_source=False) if the change is intended")
    module = import_file(source)
    model, attr = find_model(module, source, manifest["attr"])
    _load_into(model, folder / "original.pt")
    inputs = _tensors(folder / "inputs.pt")
    return LoadedModel(model, tuple(inputs["args"]), dict(inputs["kwargs"]), path=source, attr=attr)


def _tensors(path: Path) -> Any:
    """A tensor file of the artefact, read without unpickling code; damage is a message, not a traceback."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read it is damage (struct.error, EOFError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"cannot read {path}: {first}",
                          hint="the artefact is damaged or was not written by gradxform (only plain tensors are "
                               "loaded, never pickled code); recompile it") from None


def _load_into(module: Any, path: Path) -> None:
    try:
        module.load_state_dict(_tensors(path))
    except (RuntimeError, KeyError) as e:
        raise ExportError(f"{path} does not fit the model rebuilt from the artefact's source: "
                          f"{str(e).strip().splitlines()[0]}",
                          hint="the source or the pipeline changed since it was compiled; recompile it") from None
