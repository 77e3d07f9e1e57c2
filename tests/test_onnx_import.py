"""The built-in ONNX converter: zoo and hand-written CNNs exported to ONNX come back as fx GraphModules of real torch
layers that reproduce onnxruntime, keep their layer names, and slim like the original; anything else is one line."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn

from edgecompact.deploy.onnx import export_onnx, session
from edgecompact.errors import ConfigError
from edgecompact.models import create_model
from edgecompact.models.onnx_import import load_onnx_model
from edgecompact.structure import analyze, mask, slim

torch.set_num_threads(1)
SIZE = 12


class Handwritten(nn.Module):
    """Concat of two branches read by an unfused BatchNorm, a dilated conv, an asymmetric pad before a strided
    depthwise conv, an SE-style gate (ReduceMean, HardSigmoid, Mul), pools, HardSwish, a Gemm, Dropout and a
    MatMul + Add head with a constant weight."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left, self.right = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3, padding=2, dilation=2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pad, self.dw = nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(8, 8, 3, stride=2, groups=8)
        self.squeeze, self.excite = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.pool, self.avg = nn.MaxPool2d(2, ceil_mode=True), nn.AvgPool2d(3, 1, 1)
        self.fc, self.drop = nn.Linear(8 * 3 * 3, 16), nn.Dropout(0.5)
        self.w, self.b = nn.Parameter(torch.randn(16, 3)), nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu6(self.bn(torch.cat([self.left(x), self.right(x)], 1)))
        x = self.dw(self.pad(x))
        x = x * F.hardsigmoid(self.excite(F.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        x = F.hardswish(self.avg(self.pool(x)))
        x = torch.sigmoid(self.fc(x.view(x.size(0), -1)))
        return self.drop(x) @ self.w + self.b


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that a BN folded into its conv changes the weights."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
    return model.eval()


def _export_dynamic(model: nn.Module, path: Path) -> Path:
    """torch.onnx export with a dynamic batch axis and no simplification (Shape/Gather/Concat before the Reshape)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, SIZE, SIZE),), str(path), input_names=["x"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    return path


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    files = {}
    for name in ("resnet20", "mobilenet_v2_cifar"):
        files[name] = d / f"{name}.onnx"
        export_onnx(_randomize_bn(create_model(name, num_classes=3, in_channels=3, input_size=SIZE)),
                    (1, 3, SIZE, SIZE), files[name])
    net = _randomize_bn(Handwritten())
    files["handwritten"] = _export_dynamic(net, d / "handwritten.onnx")
    files["handwritten_simplified"] = d / "handwritten_simplified.onnx"
    export_onnx(net, (1, 3, SIZE, SIZE), files["handwritten_simplified"])
    return files


def _onnxruntime(path: Path, x: np.ndarray) -> np.ndarray:
    sess = session(path)
    if sess.get_inputs()[0].shape[0] == 1:  # exported with a static batch of 1
        return np.concatenate([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    return sess.run(None, {"x": x})[0]


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2_cifar", "handwritten", "handwritten_simplified"])
@pytest.mark.parametrize("batch", [1, 4])
def test_converted_model_matches_onnxruntime(onnx_files: dict[str, Path], name: str, batch: int) -> None:
    model = load_onnx_model(onnx_files[name], num_classes=3, in_channels=3, input_size=SIZE)
    assert isinstance(model, fx.GraphModule) and not model.training
    x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
    want = _onnxruntime(onnx_files[name], x.numpy())
    with torch.no_grad():
        got = model(x).numpy()
    assert got.shape == (batch, 3)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))


def test_handwritten_net_becomes_real_torch_layers(onnx_files: dict[str, Path]) -> None:
    ops = _ops(onnx_files["handwritten"])
    assert {"Concat", "BatchNormalization", "Pad", "Shape", "Reshape", "MatMul", "Gemm"} <= ops
    model = load_onnx_model(onnx_files["handwritten"], num_classes=3, in_channels=3, input_size=SIZE)
    layers = dict(model.named_children())
    assert isinstance(layers["bn"], nn.BatchNorm2d) and isinstance(layers["fc"], nn.Linear)
    assert layers["right"].dilation == (2, 2) and layers["dw"].groups == 8
    head = [m for m in layers.values() if isinstance(m, nn.Linear) and m.out_features == 3]
    assert len(head) == 1 and head[0].bias is not None  # MatMul + Add fused into one nn.Linear
    assert "pad" in model.code and "cat" in model.code and "flatten" in model.code
    # onnxsim folds the pad into the conv's (asymmetric) pads: converted to an F.pad before a padding-free conv
    simplified = load_onnx_model(onnx_files["handwritten_simplified"], num_classes=3, in_channels=3, input_size=SIZE)
    assert "Pad" not in _ops(onnx_files["handwritten_simplified"]) and "pad" in simplified.code


def test_fused_batchnorm_export_becomes_convs_with_bias_copied_exactly(onnx_files: dict[str, Path]) -> None:
    path = onnx_files["resnet20"]
    assert "BatchNormalization" not in _ops(path)
    model = load_onnx_model(path, num_classes=3, in_channels=3, input_size=SIZE)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    convs = {n: m for n, m in model.named_children() if isinstance(m, nn.Conv2d)}
    assert {"conv1", "layer1_0_conv1", "layer3_2_conv2"} <= set(convs)  # names follow the torch modules
    assert all(m.bias is not None for m in convs.values())
    graph = onnx.load(str(path)).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    conv1 = next(n for n in graph.node if n.name == "/conv1/Conv")
    assert np.array_equal(convs["conv1"].weight.detach().numpy(), weights[conv1.input[1]])
    assert np.array_equal(convs["conv1"].bias.detach().numpy(), weights[conv1.input[2]])


def test_converted_resnet20_slims_like_its_masked_copy(onnx_files: dict[str, Path]) -> None:
    model = load_onnx_model(onnx_files["resnet20"], num_classes=3, in_channels=3, input_size=SIZE)
    st = analyze(model, (3, SIZE, SIZE), "resnet20.onnx")
    original = analyze(create_model("resnet20", num_classes=3, in_channels=3, input_size=SIZE), (3, SIZE, SIZE))
    assert sorted(st.groups.values()) == sorted(original.groups.values())  # groups named by their first layer
    assert {layer.name for layer in st.layers} == {layer.name.replace(".", "_") for layer in original.layers
                                                   if layer.op != "batchnorm"}  # BatchNorms fused into the convs
    assert st.layers[-1].name == "fc" and st.layers[-1].out_group is None
    gen = torch.Generator().manual_seed(0)
    keep = {g: sorted(torch.randperm(w, generator=gen)[: max(1, w // 2)].tolist()) for g, w in st.groups.items()}
    small = slim(model, st, keep)
    x = torch.randn(4, 3, SIZE, SIZE, generator=gen)
    with torch.no_grad():
        ref, out = mask(model, st, keep)(x), small(x)
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
    assert sum(p.numel() for p in small.parameters()) < 0.5 * sum(p.numel() for p in model.parameters())


def _graph_file(path: Path, nodes: list, weights: dict[str, np.ndarray], out_shape: list) -> Path:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_gemm_with_untransposed_weight_alpha_and_beta_matches_onnxruntime(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = _graph_file(tmp_path / "gemm.onnx", [
        helper.make_node("GlobalAveragePool", ["x"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w", "c"], ["y"], name="head", alpha=0.5, beta=2.0, transB=0),
    ], {"w": rng.standard_normal((3, 5)), "c": rng.standard_normal((1, 5))}, [1, 5])
    model = load_onnx_model(path, num_classes=5, in_channels=3, input_size=4)  # raises unless it equals onnxruntime
    assert isinstance(model.head, nn.Linear) and model.head.weight.shape == (5, 3)


def test_less_common_attributes_match_onnxruntime(tmp_path: Path) -> None:
    """auto_pad SAME_UPPER, an asymmetrically padded MaxPool, scalar Sub/Div, LeakyRelu, Clip to [-1, 1], a
    HardSigmoid with ONNX's default slope, GlobalMaxPool and a Reshape to (-1, C)."""
    rng = np.random.default_rng(1)
    path = _graph_file(tmp_path / "attrs.onnx", [
        helper.make_node("Conv", ["x", "w"], ["c"], name="same", auto_pad="SAME_UPPER", strides=[2, 2]),
        helper.make_node("MaxPool", ["c"], ["m"], name="pool", kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("Sub", ["m", "half"], ["s"], name="sub"),
        helper.make_node("Div", ["s", "two"], ["d"], name="div"),
        helper.make_node("LeakyRelu", ["d"], ["l"], name="leaky", alpha=0.1),
        helper.make_node("Clip", ["l", "lo", "hi"], ["k"], name="clip"),
        helper.make_node("HardSigmoid", ["k"], ["h"], name="hsig"),
        helper.make_node("GlobalMaxPool", ["h"], ["g"], name="gmax"),
        helper.make_node("Reshape", ["g", "shape"], ["y"], name="flat"),
    ], {"w": rng.standard_normal((6, 3, 3, 3)), "half": np.array(0.5), "two": np.array(2.0), "lo": np.array(-1.0),
        "hi": np.array(1.0)}, [1, 6])
    model = onnx.load(str(path))
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, 6], dtype=np.int64), "shape"))
    onnx.save(model, str(path))
    model = load_onnx_model(path, num_classes=6, in_channels=3, input_size=4)  # raises unless it equals onnxruntime
    assert isinstance(model.clip, nn.Hardtanh) and isinstance(model.gmax, nn.AdaptiveMaxPool2d)


def test_reshape_other_than_a_flatten_is_refused_in_one_line(tmp_path: Path) -> None:
    path = _graph_file(tmp_path / "reshape.onnx", [
        helper.make_node("Reshape", ["x", "shape"], ["y"], name="fold"),
    ], {}, [1, 12, 4])
    model = onnx.load(str(path))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, 12, 4], dtype=np.int64), "shape"))
    onnx.save(model, str(path))
    with pytest.raises(ConfigError) as e:
        load_onnx_model(path, in_channels=3, input_size=4)
    assert str(e.value) == (f"--model {path}: Reshape (node 'fold') reshapes to [1, 12, 4]; the built-in converter "
                            "supports a flatten to (N, -1) only")


def test_truncated_onnx_file_is_refused_in_one_line(tmp_path: Path, onnx_files: dict[str, Path]) -> None:
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(onnx_files["resnet20"].read_bytes()[:1000])
    with pytest.raises(ConfigError) as e:
        load_onnx_model(bad, num_classes=3, in_channels=3, input_size=SIZE)
    line = str(e.value)
    assert line.startswith(f"--model {bad}: not a valid ONNX model (") and "\n" not in line
