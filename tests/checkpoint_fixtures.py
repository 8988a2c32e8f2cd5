"""Checkpoints in the key layout of Ciga et al.'s `tenpercent_resnet18.ckpt` (Lightning, SimCLR).

The real file is a PyTorch Lightning checkpoint: a dict with `epoch`, `global_step`,
`pytorch-lightning_version`, `hyper_parameters`, `optimizer_states` and `state_dict`, where the
network is the torchvision ResNet18 held as `model.resnet` whose `fc` was replaced by the SimCLR
projection head (Linear-ReLU-Linear), so keys read `model.resnet.conv1.weight`,
`model.resnet.layer1.0.bn1.running_mean`, ..., `model.resnet.fc.0.weight`, `model.resnet.fc.2.bias`.
"""

import argparse
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18


def reference_resnet(seed: int = 0) -> nn.Module:
    """A randomly initialised torchvision ResNet18 with non-trivial BatchNorm statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = resnet18(weights=None)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
            module.num_batches_tracked.fill_(1234)
    net.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))  # SimCLR head
    return net.eval()


def lightning_state_dict(net: nn.Module, prefix: str = "model.resnet.") -> dict[str, torch.Tensor]:
    return {prefix + k: v.clone() for k, v in net.state_dict().items()}


def write_checkpoint(path: str | Path, seed: int = 0, *, prefix: str = "model.resnet.",
                     drop: tuple[str, ...] = (), extra: dict | None = None,
                     reshape: dict[str, tuple] | None = None, hparams_namespace: bool = False) -> nn.Module:
    """Write a Lightning-style checkpoint of `reference_resnet(seed)`; returns that network.

    drop: trunk keys (without prefix) left out; extra: additional state-dict entries;
    reshape: trunk keys (without prefix) replaced by random tensors of another shape;
    hparams_namespace: store hyper-parameters as an argparse.Namespace, as older Lightning
    versions do (the safe `weights_only` loader refuses it).
    """
    net = reference_resnet(seed)
    state = lightning_state_dict(net, prefix)
    for key in drop:
        del state[prefix + key]
    for key, shape in (reshape or {}).items():
        state[prefix + key] = torch.randn(*shape)
    state.update(extra or {})
    hparams = {"lr": 0.0003, "batch_size": 256, "temperature": 0.5}
    checkpoint = {
        "epoch": 99,
        "global_step": 123456,
        "pytorch-lightning_version": "1.0.8",
        "state_dict": state,
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.0003, "params": []}]}],
        "lr_schedulers": [],
        "hyper_parameters": argparse.Namespace(**hparams) if hparams_namespace else hparams,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return net
