"""Finding a model and its example inputs in a Python file (``FILE[:ATTR]``).

Discovery: ``ATTR`` names an ``nn.Module`` instance or a zero-argument factory; without it gradxform
looks for ``model``, then ``build_model()``, then the single ``nn.Module`` instance in the file.
Example inputs come from the file's ``example_inputs()`` (which may take the model), else from
``--input-shape NAME:[d0,d1,...][:dtype]``.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError, did_you_mean


@dataclass
class LoadedModel:
    module: Any                      # the nn.Module
    args: tuple                      # example positional inputs
    kwargs: dict = field(default_factory=dict)
    path: Path | None = None         # the model file, when loaded from one
    attr: str | None = None          # the attribute that produced the model

    @property
    def spec(self) -> str:
        return f"{self.path}:{self.attr}" if self.path else "<in-memory model>"


def split_target(target: str) -> tuple[Path, str | None]:
    """``examples/resnet.py:resnet50`` -> (path, 'resnet50')."""
    path, sep, attr = target.rpartition(":")
    if sep and attr.isidentifier():
        return Path(path), attr
    return Path(target), None


def import_file(path: Path) -> Any:
    """Import a model file as a fresh module, with errors that point into the file."""
    if not path.exists():
        raise ModelLoadError(f"no such file: {path}", hint="give the path to a Python file that defines the model, or (train, inspect, export) an artefact "
                                  "folder written by 'gradxform compile -o DIR'")
    if path.is_dir() or path.suffix != ".py":
        raise ModelLoadError(f"{path} is not a Python file", hint="give a .py file, optionally with :ATTR")
    source = path.read_text()
    try:
        compile(source, str(path), "exec")
    except SyntaxError as e:
        raise ModelLoadError(f"syntax error: {e.msg}", where=f"{path}:{e.lineno}:{e.offset}",
                             hint=(e.text or "").strip() or None) from None
    name = f"gradxform_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.resolve()))  # the file may import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ModelLoadError(f"importing the file raised {type(e).__name__}: {e}",
                             where=user_frame(e, path) or str(path)) from None
    finally:
        sys.path.pop(0)
    return module


def user_frame(exc: BaseException, path: Path | None) -> str | None:
    """``file:line`` of the deepest traceback frame inside the user's file, if any."""
    if path is None:
        return None
    target = str(path.resolve())
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if str(Path(frame.filename).resolve()) == target:
            found = f"{path}:{frame.lineno} ({(frame.line or '').strip()})"
    return found


def _is_module(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.nn.Module)


def find_model(module: Any, path: Path, attr: str | None) -> tuple[Any, str]:
    """The model in an imported file, and the attribute it came from."""
    if attr is not None:
        if not hasattr(module, attr):
            names = [n for n in vars(module) if not n.startswith("_")]
            raise ModelLoadError(f"{path} has no attribute '{attr}'", hint=did_you_mean(attr, names))
        return _materialise(getattr(module, attr), path, attr), attr
    for name in ("model", "build_model"):
        if hasattr(module, name):
            return _materialise(getattr(module, name), path, name), name
    found = [n for n, v in vars(module).items() if not n.startswith("_") and _is_module(v)]
    if len(found) == 1:
        return getattr(module, found[0]), found[0]
    if not found:
        raise ModelLoadError(f"no nn.Module found in {path}",
                             hint="define `model = ...` or `def build_model(): ...`, or name one with FILE:ATTR")
    raise ModelLoadError(f"several nn.Module instances in {path}: {', '.join(found)}",
                         hint=f"choose one with {path}:{found[0]}")


def _materialise(obj: Any, path: Path, attr: str) -> Any:
    if _is_module(obj):
        return obj
    if inspect.isclass(obj) or callable(obj):
        try:
            made = obj()
        except TypeError as e:
            raise ModelLoadError(f"'{attr}' must be an nn.Module or a factory taking no arguments: {e}",
                                 where=str(path)) from None
        except Exception as e:
            raise ModelLoadError(f"calling '{attr}()' raised {type(e).__name__}: {e}",
                                 where=user_frame(e, path) or str(path)) from None
        if _is_module(made):
            return made
        raise ModelLoadError(f"'{attr}()' returned {type(made).__name__}, not an nn.Module", where=str(path))
    raise ModelLoadError(f"'{attr}' is a {type(obj).__name__}, not an nn.Module or a factory", where=str(path))


def normalise_inputs(value: Any) -> tuple[tuple, dict]:
    """example_inputs() may return a tensor, a tuple/list, a dict, or (tuple, dict)."""
    import torch

    if isinstance(value, torch.Tensor):
        return (value,), {}
    if isinstance(value, dict):
        return (), dict(value)
    if (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], (tuple, list))
            and isinstance(value[1], dict)):
        return tuple(value[0]), dict(value[1])
    if isinstance(value, (tuple, list)):
        return tuple(value), {}
    raise ModelLoadError(f"example_inputs() returned {type(value).__name__}",
                         hint="return a tensor, a tuple of tensors, a dict of keyword inputs, or (args, kwargs)")


_SHAPE = re.compile(r"^(?P<name>[A-Za-z_]\w*):\[(?P<dims>\s*\d+(\s*,\s*\d+)*\s*)\](:(?P<dtype>\w+))?$")


def parse_input_shapes(specs: list[str]) -> dict[str, Any]:
    """``x:[8,3,32,32]`` or ``input_ids:[2,16]:int64`` -> {name: example tensor}."""
    import torch

    out: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(0)
    for spec in specs:
        m = _SHAPE.match(spec.strip())
        if not m:
            raise ModelLoadError(f"malformed --input-shape '{spec}'",
                                 hint="write NAME:[d0,d1,...] with an optional :dtype, e.g. x:[8,3,32,32] or ids:[2,16]:int64")
        dims = [int(d) for d in m["dims"].split(",")]
        dtype_name = m["dtype"] or "float32"
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise ModelLoadError(f"unknown dtype '{dtype_name}' in --input-shape '{spec}'",
                                 hint="use float32, float64, int64, ...")
        if dtype.is_floating_point:
            out[m["name"]] = torch.randn(dims, generator=gen, dtype=dtype)
        else:  # token ids: small values stay inside any vocabulary
            out[m["name"]] = torch.randint(0, 2, dims, generator=gen, dtype=dtype)
    return out


def example_inputs_for(model: Any, module: Any | None, input_shapes: list[str] | None,
                       where: str) -> tuple[tuple, dict]:
    if input_shapes:
        kwargs = parse_input_shapes(input_shapes)
        params = list(inspect.signature(model.forward).parameters)
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            raise ModelLoadError(f"--input-shape names '{unknown[0]}', which forward() does not take",
                                 hint=f"forward takes: {', '.join(params)}")
        return (), kwargs
    fn = getattr(module, "example_inputs", None) if module is not None else None
    if fn is None:
        raise ModelLoadError(f"no example inputs for {where}",
                             hint="define example_inputs() in the file, or pass --input-shape x:[8,3,32,32]")
    takes_model = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                      for p in inspect.signature(fn).parameters.values())
    try:
        value = fn(model) if takes_model else fn()
    except Exception as e:
        raise ModelLoadError(f"example_inputs() raised {type(e).__name__}: {e}", where=where) from None
    return normalise_inputs(value)


def load(target: str, input_shapes: list[str] | None = None) -> LoadedModel:
    """Import ``FILE[:ATTR]`` and return the model with its example inputs."""
    path, attr = split_target(target)
    module = import_file(path)
    model, attr = find_model(module, path, attr)
    args, kwargs = example_inputs_for(model, module, input_shapes, str(path))
    return LoadedModel(model, args, kwargs, path=path, attr=attr)
