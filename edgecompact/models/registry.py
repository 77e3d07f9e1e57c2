"""The model registry: zoo names -> factories, plus loading a user's own model from a file or a module.

One entry point, `load_model`, turns a `--model` spec (a zoo name, a user's factory or an ONNX file) into an
`nn.Module`, and `load_weights` loads a trained state dict into it. Factories build plain modules: nothing here
trains, prunes or counts.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgecompact.errors import ConfigError

Factory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelDefaults:
    """The setting a zoo model is used in by the paper (or its usual setting): classes, image size, dataset."""

    num_classes: int
    input_size: int
    in_channels: int = 3
    dataset: str = ""


_FACTORIES: dict[str, Factory] = {}
_DEFAULTS: dict[str, ModelDefaults] = {}


def register_model(num_classes: int = 10, input_size: int = 32, dataset: str = "") -> Callable[[Factory], Factory]:
    """Decorator: register a factory under its function name with its default setting."""

    def wrap(fn: Factory) -> Factory:
        if fn.__name__ in _FACTORIES:
            raise ValueError(f"model {fn.__name__} registered twice")
        _FACTORIES[fn.__name__] = fn
        _DEFAULTS[fn.__name__] = ModelDefaults(num_classes=num_classes, input_size=input_size, dataset=dataset)
        return fn

    return wrap


def list_models() -> list[str]:
    """Names of every zoo model, sorted."""
    return sorted(_FACTORIES)


def _check_name(name: str) -> None:
    if name not in _FACTORIES:
        raise ConfigError(f"unknown model '{name}' (known: {', '.join(list_models())})")


def model_defaults(name: str) -> ModelDefaults:
    """The default setting (classes, input size, dataset) of zoo model `name`."""
    _check_name(name)
    return _DEFAULTS[name]


def create_model(name: str, num_classes: int | None = None, in_channels: int = 3, input_size: int | None = None,
                 **kwargs: Any) -> nn.Module:
    """Build zoo model `name`; `None` takes the model's default (`model_defaults(name)`). Extra kwargs go
    to the factory (e.g. `shortcut=` of the CIFAR ResNets)."""
    defaults = model_defaults(name)
    return _FACTORIES[name](
        num_classes=defaults.num_classes if num_classes is None else num_classes,
        in_channels=in_channels,
        input_size=defaults.input_size if input_size is None else input_size,
        **kwargs,
    )


def _factory_from_spec(spec: str) -> Factory:
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"model file '{path}' not found (from --model {spec})")
        module_name = f"_edgecompact_user_model_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ConfigError(f"model file '{path}' cannot be imported as Python")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        loader_spec.loader.exec_module(module)  # errors inside the user's own code keep their traceback
        where = f"file '{path}'"
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ConfigError(f"model module '{target}' cannot be imported: {e}") from None
        where = f"module '{target}'"
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"model factory '{attr}' not found in {where}")
    return factory


def load_model(spec: str, num_classes: int | None = None, in_channels: int = 3,
               input_size: int | None = None) -> nn.Module:
    """A model from a zoo name, `path/to/file.py:factory`, `package.module:factory` or `path/to/model.onnx`.

    A user factory is called with whichever of num_classes / in_channels / input_size it accepts (values
    left as None are not passed) and must return an `nn.Module`. An ONNX file is converted and verified
    (`edgecompact.models.onnx_import`); it carries its trained weights.
    """
    if spec.endswith(".onnx"):
        from edgecompact.models.onnx_import import load_onnx_model

        return load_onnx_model(Path(spec), num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    if ":" not in spec:
        if spec.endswith(".py"):
            raise ConfigError(f"--model {spec}: name the factory in the file, e.g. '{spec}:build_model'")
        return create_model(spec, num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    factory = _factory_from_spec(spec)
    offered = {"num_classes": num_classes, "in_channels": in_channels, "input_size": input_size}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if v is not None and (takes_any or k in params)}
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory '{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: Path, model_name: str = "the model", what: str = "--weights") -> nn.Module:
    """Load trained weights into `model` in place: a `.safetensors` file, or a torch file read with weights_only
    (a state dict, or a checkpoint holding one under "model" or "state_dict"). A file that does not fit is one
    ConfigError naming the first key that differs."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not path.is_file():
            raise ConfigError(f"{what} {path}: file not found")
        try:
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError...: a bad file, reported in one line
            raise ConfigError(f"{what} {path}: not a readable safetensors file ({_first_line(e)})") from None
    else:
        from edgecompact.train import load_checkpoint

        state = load_checkpoint(path)
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{what} {path}: holds no state dict of tensors")
    expected = model.state_dict()
    if all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in expected):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel / DDP
    differ = _first_difference(expected, state)
    if differ:
        raise ConfigError(f"{what} {path}: does not fit {model_name}: {differ}")
    model.load_state_dict(state)
    return model


def _first_difference(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str | None:
    for key, value in expected.items():
        if key not in given:
            return f"key '{key}' of the model is missing from the file"
        if tuple(given[key].shape) != tuple(value.shape):
            return f"key '{key}' is {list(given[key].shape)} in the file, {list(value.shape)} in the model"
    extra = next((k for k in given if k not in expected), None)
    return None if extra is None else f"key '{extra}' of the file is not in the model"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]
