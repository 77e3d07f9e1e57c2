"""The model zoo: registry, per-model defaults, the factory interface, and users' own models."""

import textwrap

import pytest
import torch
from torch import nn

from edgecompact.errors import ConfigError
from edgecompact.models import create_model, list_models, load_model, model_defaults
from edgecompact.models.inception import InceptionV3
from edgecompact.models.mobilenet import MobileNetV2
from edgecompact.models.resnet import ResNet

torch.set_num_threads(1)

PAPER_MODELS = {"resnet32": (10, 32), "resnet50_cifar": (100, 32), "resnet50_imagenet64": (1000, 64),
                "inception_v3_imagenet64": (1000, 64)}


def test_zoo_lists_every_family():
    names = list_models()
    assert names == sorted(names)
    for name in ["resnet20", "resnet32", "resnet56", "resnet110", "resnet50_cifar", "resnet50_imagenet64",
                 "inception_v3_imagenet64", "mobilenet_v2_cifar", "shufflenet_v2_cifar", "ghostnet_cifar",
                 "mobilenet_v2_se_cifar", "densenet_cifar"]:
        assert name in names


@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_defaults_are_the_papers_setting(name):
    d = model_defaults(name)
    assert (d.num_classes, d.input_size, d.in_channels) == (*PAPER_MODELS[name], 3)
    out = create_model(name).eval()(torch.randn(1, 3, d.input_size, d.input_size))
    assert out.shape == (1, d.num_classes)


@pytest.mark.parametrize("name", list_models())
def test_create_model_honors_classes_channels_and_input_size(name):
    size = 40
    model = create_model(name, num_classes=7, in_channels=1, input_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("build,size,params", [
    (lambda: ResNet((3, 4, 6, 3), 1000, 3, stem_maxpool=True), 224, 25_557_032),
    (lambda: InceptionV3(1000, 3, small_input=False), 299, 23_834_568),
    (lambda: MobileNetV2(1000, 3, small_input=False), 224, 3_504_872),
])
def test_families_unadapted_are_the_torchvision_architectures(build, size, params):
    # torchvision's published parameter counts (resnet50, inception_v3 without aux head, mobilenet_v2)
    model = build().eval()
    assert sum(p.numel() for p in model.parameters()) == params
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 1000)


def test_inception_rejects_too_small_input():
    with pytest.raises(ConfigError, match="input_size 8"):
        create_model("inception_v3_imagenet64", input_size=8)


def test_zoo_models_use_relu_modules_not_functional_calls():
    # torch-pruning and the structure analysis see modules; an nn.ReLU per activation keeps that visible.
    model = create_model("resnet20")
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 1 + 2 * 9


def test_conv3x3_shortcut_adds_exactly_the_larger_projection_weights():
    base = sum(p.numel() for p in create_model("resnet32").parameters())
    wide = sum(p.numel() for p in create_model("resnet32", shortcut="conv3x3").parameters())
    assert wide - base == (9 - 1) * (16 * 32 + 32 * 64)


def test_unknown_model_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="resnet33"):
        create_model("resnet33")
    with pytest.raises(ConfigError, match="resnet33"):
        load_model("resnet33")


USER_MODEL = textwrap.dedent("""
    from torch import nn

    def build(num_classes, in_channels=3):
        return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, num_classes))

    def not_a_model(num_classes):
        return "nope"
""")


def test_user_model_loads_from_file_factory(tmp_path):
    path = tmp_path / "my_net.py"
    path.write_text(USER_MODEL)
    # build() takes no input_size: it is offered only the arguments it declares
    model = load_model(f"{path}:build", num_classes=5, in_channels=2, input_size=16)
    assert model(torch.randn(1, 2, 16, 16)).shape == (1, 5)


def test_user_model_loads_from_package_module(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load_model("userpkg.nets:build", num_classes=3)
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 3)


def test_user_model_errors_name_the_file_or_factory(tmp_path):
    path = tmp_path / "my_net.py"
    path.write_text(USER_MODEL)
    with pytest.raises(ConfigError, match="missing.py"):
        load_model(f"{tmp_path / 'missing.py'}:build", num_classes=3)
    with pytest.raises(ConfigError, match="'make_net'"):
        load_model(f"{path}:make_net", num_classes=3)
    with pytest.raises(ConfigError, match="not a torch.nn.Module"):
        load_model(f"{path}:not_a_model", num_classes=3)
    with pytest.raises(ConfigError, match="name the factory"):
        load_model(str(path), num_classes=3)
    with pytest.raises(ConfigError, match="no_such_pkg"):
        load_model("no_such_pkg.nets:build", num_classes=3)
