"""Run by tests/test_train.py under torchrun: trains a tiny net with DDP (gloo) and saves rank 0's weights."""

import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

from edgecompact.train import TrainConfig, train


def tiny_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g))
    cfg = TrainConfig(epochs=2, lr=0.1, batch_size=16, shuffle=False, progress=False)
    return model, data, cfg


if __name__ == "__main__":
    torch.set_num_threads(1)
    model, data, cfg = tiny_setup()
    train(model, data, cfg, device=torch.device("cpu"))
    import torch.distributed as dist

    if dist.get_rank() == 0:
        torch.save(model.state_dict(), sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()
