"""A tiny synthetic classification job for the workflow tests (also used by the CLI through a config).

Inputs are 1x8x8 images of noise with a bright quadrant; the label is the quadrant (4 classes),
so a small CNN learns it within an epoch or two and pruning visibly costs accuracy.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset


class TinyNet(nn.Module):
    """conv-bn-relu x 2 (the second with a residual), pool, linear."""

    def __init__(self, width: int = 8, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


class IntWidthNet(TinyNet):
    """TinyNet whose forward holds conv3's width in a Python int (``reshape(n, self.hidden, -1)``): tracing
    cannot see it, so only validation can keep conv3's channels (else the slim model fails in ``fc``)."""

    def __init__(self, width: int = 8, num_classes: int = 4) -> None:
        super().__init__(width, num_classes)
        self.hidden = 2 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.reshape(x.shape[0], self.hidden, -1).mean(2))


def tensors(n: int = 192, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    y = torch.randint(0, 4, (n,), generator=g)
    for i, q in enumerate(y.tolist()):
        r, c = divmod(q, 2)
        x[i, 0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 1.0
    return x, y


def loaders(n_train: int = 192, n_eval: int = 64, batch_size: int = 32, seed: int = 0):
    """``(train_loader, eval_loader)``: the function a config names as ``data.loaders``."""
    xt, yt = tensors(n_train, seed)
    xe, ye = tensors(n_eval, seed + 1)
    return (
        DataLoader(TensorDataset(xt, yt), batch_size=batch_size, shuffle=True),
        DataLoader(TensorDataset(xe, ye), batch_size=64),
    )


@functools.lru_cache(maxsize=4)
def _trained_state(seed: int, epochs: int) -> dict[str, torch.Tensor]:
    from prunekit.workflow.finetune import FinetuneConfig, finetune

    torch.manual_seed(seed)
    model = TinyNet()
    train, _ = loaders(seed=seed)
    finetune(
        model,
        train,
        None,
        FinetuneConfig(epochs=epochs, optimizer="adamw", lr=1e-2, progress=False),
        log=lambda m: None,
    )
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained(seed: int = 0, epochs: int = 3) -> TinyNet:
    """A fresh TinyNet with the weights of a few deterministic training epochs on :func:`loaders` (cached)."""
    model = TinyNet()
    model.load_state_dict(_trained_state(seed, epochs))
    return model.eval()


def write_config(tmp_path: Path, **sections) -> Path:
    """A ``prunekit`` config for this job in ``tmp_path``; each keyword updates one section."""
    import yaml

    cfg = {
        "workspace": str(tmp_path / "ws"),
        "model": {"factory": "tinyjob:TinyNet"},
        "data": {"loaders": "tinyjob:loaders"},
        "ana": {"ratios": [0.3, 0.6]},
        "finetune": {"epochs": 1, "lr": 0.02, "progress": False},
        "run": {"schedule": [0.3, 0.5]},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
