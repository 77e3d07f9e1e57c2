"""The baseline model zoo: `list_models()`, `create_model(name, ...)`, `load_model(spec, ...)`.

One file per family registers its factories with `@register_model`; a user's own model loads through the same
`load_model` from `path/to/file.py:factory`, `package.module:factory` or an ONNX file; `load_weights` loads a
trained state dict (torch or safetensors) into it.
"""

from edgecompact.models import (  # noqa: F401  (registers the zoo)
    densenet,
    ghostnet,
    inception,
    mobilenet,
    resnet,
    resnet_cifar,
    shufflenet,
)
from edgecompact.models.registry import (
    ModelDefaults,
    create_model,
    list_models,
    load_model,
    load_weights,
    model_defaults,
    register_model,
)

__all__ = ["ModelDefaults", "create_model", "list_models", "load_model", "load_weights", "model_defaults",
           "register_model"]
