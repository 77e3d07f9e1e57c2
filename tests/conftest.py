"""Shared fixtures: a small trained baseline on digits that method tests search from."""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch

torch.set_num_threads(1)
# Tests never read or write the user's cache (this CPU's latency tables, tuning databases, decoded folders): one
# private cache per test session, also for the CLI subprocesses the tests start.
os.environ["EDGECOMPACT_CACHE"] = tempfile.mkdtemp(prefix="edgecompact-test-cache-")


@pytest.fixture(scope="session")
def digits16():
    """Digits at 16x16 (the embedded default dataset, small enough for unit tests)."""
    from edgecompact.data import load_dataset

    return load_dataset("digits", input_size=16)


@pytest.fixture(scope="session")
def trained_resnet20(digits16):
    """A ResNet-20 trained 3 epochs on digits16 (about 90% top-1); tests must deepcopy before changing it."""
    from edgecompact.models import create_model
    from edgecompact.train import TrainConfig, train

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=digits16.num_classes, in_channels=digits16.in_channels,
                         input_size=digits16.input_size)
    train(model, digits16.train, TrainConfig(epochs=3, lr=0.05, batch_size=64, progress=False))
    return model.eval()


@pytest.fixture
def make_context(digits16, trained_resnet20):
    """make_context(budget="0.33x", **build_context kwargs) -> SearchContext on a copy of the trained ResNet-20."""
    from edgecompact.pipeline import build_context
    from edgecompact.train import TrainConfig

    def make(budget: str = "0.33x", **kw):
        kw.setdefault("finetune", TrainConfig(epochs=1, lr=0.02, batch_size=64, progress=False))
        kw.setdefault("search_epochs", 1)
        kw.setdefault("log", lambda *_: None)
        return build_context(copy.deepcopy(trained_resnet20), digits16, budget, model_name="resnet20", **kw)

    return make


@pytest.fixture
def count_mflops():
    """count_mflops(model, ctx) -> MFLOPs of one forward at batch 1, counted by torch's own FlopCounterMode."""
    from edgecompact.structure_check import torch_flops

    def count(model, ctx) -> float:
        c, s = ctx.data.in_channels, ctx.data.input_size
        return torch_flops(model, (c, s, s)) / 1e6

    return count
