"""The CIFAR-10 classifier: a batch-normed PyTorch CNN built from a plain dict of knobs.

job2 reads this file to tell the framework (it looks for `torch.nn` / `nn.Conv2d`), and the tuner
searches over the knobs in `NET_DEFAULTS`. Two architectures:

- "fast": stem conv, then `blocks` conv blocks (conv, max-pool, BN, GELU, then
  `convs_per_block - 1` more conv-BN-GELU), global max-pool, linear head. Widths double per block
  from `width`. Every conv is 3x3 without bias (BN follows); everything works in channels_last.
- "original": the recipe this project started from, kept as the benchmark's baseline: three convs
  16/32/64 with max-pool, no batch norm, dropout 0.25, fc 500.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# The knobs of the model, with their defaults. Keys and value types are the tuner's search space.
NET_DEFAULTS: dict[str, Any] = {
    "arch": "fast",  # "fast" or "original"
    "width": 16,  # channels of the stem; block i has width * 2**(i+1)
    "blocks": 3,  # conv blocks, each halving the resolution (1 to 4)
    "convs_per_block": 2,  # convs in a block (1 to 3)
    "dropout": 0.0,  # before the classifier
    "head_scale": 0.125,  # logits are scaled down: a cooler start trains faster with BN nets
    "activation": "gelu",  # "gelu" or "relu" (relu is about 7% faster on CPU)
}
# What each knob means, for train.py's --help.
NET_HELP: dict[str, str] = {
    "arch": "the architecture: fast or original",
    "width": "channels of the stem; block i has width * 2**(i+1) (1 to 512)",
    "blocks": "conv blocks, each halving the resolution (1 to 4)",
    "convs_per_block": "convolutions in a block (1 to 3)",
    "dropout": "dropout before the classifier, in [0, 1)",
    "head_scale": "factor on the logits (a cooler start trains BN nets faster)",
    "activation": "gelu or relu (relu is about 7% faster on CPU)",
}
ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}

ARCHS = ("fast", "original")


def check_net_config(cfg: dict[str, Any]) -> None:
    """Raise ValueError with a one-line reason when a knob is out of its range."""
    if cfg["arch"] not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, not {cfg['arch']!r}")
    if not 1 <= int(cfg["width"]) <= 512:
        raise ValueError(f"width must be in 1..512, not {cfg['width']}")
    if not 1 <= int(cfg["blocks"]) <= 4:
        raise ValueError(f"blocks must be in 1..4 (each halves 32x32), not {cfg['blocks']}")
    if not 1 <= int(cfg["convs_per_block"]) <= 3:
        raise ValueError(f"convs_per_block must be in 1..3, not {cfg['convs_per_block']}")
    if not 0.0 <= float(cfg["dropout"]) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), not {cfg['dropout']}")
    if cfg["activation"] not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, "
                         f"not {cfg['activation']!r}")


def conv_bn(c_in: int, c_out: int, activation: str, pool: bool = False) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]
    if pool:  # pooling before BN quarters the work of BN and the activation
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(c_out), ACTIVATIONS[activation]()]
    return layers


def global_max_pool(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C). Both forms give the same numbers; the faster one per device:
    adaptive_max_pool2d trains about 8% faster on CPU, while on CUDA its backward is
    non-deterministic and amax's is not (an exact resume needs determinism)."""
    if x.device.type == "cpu":
        return F.adaptive_max_pool2d(x, 1).flatten(1)
    return x.amax(dim=(2, 3))


class FastCNN(nn.Module):
    def __init__(self, width: int, blocks: int, convs_per_block: int, dropout: float,
                 head_scale: float, activation: str) -> None:
        super().__init__()
        layers = conv_bn(3, width, activation)
        c_in = width
        for i in range(blocks):
            c_out = width * 2 ** (i + 1)
            layers += conv_bn(c_in, c_out, activation, pool=True)
            for _ in range(convs_per_block - 1):
                layers += conv_bn(c_out, c_out, activation)
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c_in, 10, bias=False)
        self.head_scale = head_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = global_max_pool(self.features(x))
        return self.head(self.dropout(x)) * self.head_scale


class OriginalCNN(nn.Module):
    """The starting point: 3 convs (16/32/64) + max-pool, dropout 0.25, fc 500, no batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 4 * 4, 500), nn.ReLU(),
            nn.Dropout(0.25), nn.Linear(500, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(cfg: dict[str, Any]) -> nn.Module:
    """The model for a config holding (at least) the keys of NET_DEFAULTS."""
    cfg = {**NET_DEFAULTS, **{k: v for k, v in cfg.items() if k in NET_DEFAULTS}}
    check_net_config(cfg)
    if cfg["arch"] == "original":
        return OriginalCNN()
    return FastCNN(int(cfg["width"]), int(cfg["blocks"]), int(cfg["convs_per_block"]),
                   float(cfg["dropout"]), float(cfg["head_scale"]), str(cfg["activation"]))
