"""The CIFAR-10 classifier: a batch-normed PyTorch CNN built from a plain dict of knobs.

job2 reads this file to tell the framework (it looks for `torch.nn` / `nn.Conv2d`); the knobs are
in `PLAIN_NET`, and the tuner searches over some of them (ct.trainer.study). Two architectures:

- "fast": stem conv, then `blocks` conv blocks (conv, max-pool, BN, GELU, then
  `convs_per_block - 1` more conv-BN-GELU), global max-pool, linear head. Widths double per block
  from `width`. Every conv is 3x3 without bias (BN follows); everything works in channels_last.
  With `stem` "whiten" the stem is airbench's instead: a frozen 2x2 conv whose filters whiten the
  training images' 2x2 patches (`whitening_weights`, set by `init_whitening`), a trained bias,
  the activation and no BN; it gives 24 channels at 31x31.
- "original": the recipe this project started from, kept as the benchmark's baseline: three convs
  16/32/64 with max-pool, no batch norm, dropout 0.25, fc 500.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# The knobs of the model at the plain recipe's values (ct.trainer.config.PLAIN_RECIPE takes them).
# build_model fills a knob a config lacks from here; a value's type is the type its flag parses.
PLAIN_NET: dict[str, Any] = {
    "arch": "fast",  # "fast" or "original"
    "width": 16,  # channels of the stem; block i has width * 2**(i+1)
    "blocks": 3,  # conv blocks, each halving the resolution (1 to 4)
    "convs_per_block": 2,  # convs in a block (1 to 3)
    "dropout": 0.0,  # before the classifier
    "head_scale": 0.125,  # logits are scaled down: a cooler start trains faster with BN nets
    "activation": "gelu",  # "gelu" or "relu" (relu is about 7% faster on CPU)
    "stem": "conv",  # "conv" (3x3 conv, BN) or "whiten" (airbench's frozen 2x2 whitening conv)
    "block_widths": "",  # e.g. "24,96,96": each block's channels; empty: width * 2**(i+1)
    "bn_scales": True,  # train each batch norm's scale; False: fixed at 1, as airbench
    "dirac_init": False,  # 3x3 convs start as identity on their first channels, as airbench
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
    "stem": "conv (3x3 conv, BN) or whiten (a frozen 2x2 conv whitening the training images' "
            "patches, 24 channels, no BN, as airbench; width then sets the blocks only)",
    "block_widths": "comma list of each block's channels, one per block (e.g. 24,96,96); "
                    "empty: width * 2**(i+1)",
    "bn_scales": "train each batch norm's scale (no: fixed at 1, only the shift trains, as "
                 "airbench)",
    "dirac_init": "start each 3x3 conv as the identity on its first input channels, the rest "
                  "random (airbench's dirac init: a short run starts from a net that passes its "
                  "input through)",
}
ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}

ARCHS = ("fast", "original")
STEMS = ("conv", "whiten")
WHITEN_KERNEL = 2
WHITEN_CHANNELS = 2 * 3 * WHITEN_KERNEL ** 2  # every direction of a 2x2x3 patch, and its negative
WHITEN_EPS = 5e-4  # airbench's: bounds the gain of the weakest directions (mostly noise)
WHITEN_CHUNK = 500  # images per step of the covariance sum: bounded memory in float64


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
    widths = cfg.get("block_widths", "")
    if widths and not _widths_ok(widths, int(cfg["blocks"])):
        raise ValueError(f"block_widths must be {cfg['blocks']} comma-separated channel counts "
                         f"in 1..1024 (one per block), not {widths!r}")
    if cfg["stem"] not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(STEMS)}, not {cfg['stem']!r}")
    if cfg["stem"] != "conv" and cfg["arch"] != "fast":
        raise ValueError(f"stem {cfg['stem']} needs arch fast, not {cfg['arch']!r}")


def _widths_ok(text: str, blocks: int) -> bool:
    parts = text.split(",")
    return (len(parts) == blocks and all(p.strip().isdigit() for p in parts)
            and all(1 <= int(p) <= 1024 for p in parts))


def block_widths(cfg: dict[str, Any]) -> list[int]:
    """Each block's channels: `block_widths` when given, else doubling from `width`."""
    if cfg.get("block_widths"):
        return [int(part) for part in str(cfg["block_widths"]).split(",")]
    return [int(cfg["width"]) * 2 ** (i + 1) for i in range(int(cfg["blocks"]))]


def ignored_keys(cfg: dict[str, Any]) -> frozenset[str]:
    """Net keys this config's network does not read. `width` sizes the conv stem and the
    doubling block widths only: the whitening stem with explicit block widths ignores it."""
    if cfg.get("arch") == "fast" and cfg.get("stem") == "whiten" and cfg.get("block_widths"):
        return frozenset({"width"})
    return frozenset()


def conv_bn(c_in: int, c_out: int, activation: str, pool: bool = False,
            bn_scales: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]
    if pool:  # pooling before BN quarters the work of BN and the activation
        layers.append(nn.MaxPool2d(2))
    norm = nn.BatchNorm2d(c_out)
    norm.weight.requires_grad_(bn_scales)  # frozen: stays 1, and no optimizer holds it
    layers += [norm, ACTIVATIONS[activation]()]
    return layers


def global_max_pool(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C). Both forms give the same numbers; the faster one per device:
    adaptive_max_pool2d trains about 8% faster on CPU, while on CUDA its backward is
    non-deterministic and amax's is not (an exact resume needs determinism)."""
    if x.device.type == "cpu":
        return F.adaptive_max_pool2d(x, 1).flatten(1)
    return x.amax(dim=(2, 3))


def whitening_stem(activation: str) -> list[nn.Module]:
    """airbench's stem: no padding (32x32 -> 31x31), a bias instead of BN. The weight is frozen
    from the start, so no optimizer ever holds it; `init_whitening` sets it."""
    conv = nn.Conv2d(3, WHITEN_CHANNELS, WHITEN_KERNEL, padding=0, bias=True)
    conv.weight.requires_grad_(False)
    return [conv, ACTIVATIONS[activation]()]


def whitening_weights(images: torch.Tensor, eps: float = WHITEN_EPS) -> torch.Tensor:
    """Conv weights (24, 3, 2, 2) that whiten the 2x2 patches of `images` (normalised float,
    N x 3 x H x W): the eigenvectors of the patches' uncentred covariance, strongest first, each
    divided by sqrt(eigenvalue + eps), then the same negated so that the activation passes both
    signs (airbench's init_whitening_conv). Summed in float64 on the CPU: the same weights on
    every device, and no rounding from millions of patches in one float32 sum."""
    dim = images.shape[1] * WHITEN_KERNEL ** 2
    covariance = torch.zeros(dim, dim, dtype=torch.float64)
    count = 0
    for chunk in images.detach().split(WHITEN_CHUNK):
        # unfold orders each patch channel-major, then row, then column: a conv weight's layout.
        patches = F.unfold(chunk.to("cpu", torch.float64), WHITEN_KERNEL)
        patches = patches.transpose(1, 2).reshape(-1, dim)
        covariance += patches.T @ patches
        count += len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance / max(1, count))  # ascending
    values, vectors = eigenvalues.flip(0), eigenvectors.T.flip(0)  # one filter per row
    scaled = vectors / torch.sqrt(values.clamp(min=0) + eps)[:, None]
    weights = torch.cat((scaled, -scaled)).reshape(-1, images.shape[1], WHITEN_KERNEL,
                                                   WHITEN_KERNEL)
    return weights.float()


@torch.no_grad()
def _dirac_init(features: nn.Module) -> None:
    """airbench's Conv.reset_parameters: after PyTorch's random init, each 3x3 conv's first
    min(c_in, c_out) filters become the identity, so the block starts as a pass-through plus random
    channels. The random init has already drawn its numbers, so the seed's other draws stay."""
    for conv in features.modules():
        if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
            nn.init.dirac_(conv.weight[:conv.in_channels])


class FastCNN(nn.Module):
    def __init__(self, width: int, widths: list[int], convs_per_block: int, dropout: float,
                 head_scale: float, activation: str, stem: str = "conv",
                 bn_scales: bool = True, dirac_init: bool = False) -> None:
        super().__init__()
        self.stem = stem
        if stem == "whiten":
            layers, c_in = whitening_stem(activation), WHITEN_CHANNELS
        else:
            layers, c_in = conv_bn(3, width, activation, bn_scales=bn_scales), width
        for c_out in widths:
            layers += conv_bn(c_in, c_out, activation, pool=True, bn_scales=bn_scales)
            for _ in range(convs_per_block - 1):
                layers += conv_bn(c_out, c_out, activation, bn_scales=bn_scales)
            c_in = c_out
        self.features = nn.Sequential(*layers)
        if dirac_init:
            _dirac_init(self.features)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c_in, 10, bias=False)
        self.head_scale = head_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = global_max_pool(self.features(x))
        return self.head(self.dropout(x)) * self.head_scale

    def whitening_conv(self) -> nn.Conv2d:
        assert self.stem == "whiten", "only the whitening stem has a whitening conv"
        conv = self.features[0]
        assert isinstance(conv, nn.Conv2d)
        return conv

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor) -> None:
        """Set the frozen whitening filters from normalised training images (airbench: the
        first 5,000); uses no random numbers."""
        weight = self.whitening_conv().weight
        weight.copy_(whitening_weights(images).to(weight.device))

    def train_whitening_bias(self, trainable: bool) -> None:
        """airbench trains the whitening bias for the first epochs only. A frozen bias gets no
        gradient, so the optimizer skips it while keeping its state for a later resume."""
        self.whitening_conv().bias.requires_grad_(trainable)


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
    """The model for a config; a knob it lacks takes its PLAIN_NET value."""
    cfg = {**PLAIN_NET, **{k: v for k, v in cfg.items() if k in PLAIN_NET}}
    check_net_config(cfg)
    if cfg["arch"] == "original":
        return OriginalCNN()
    return FastCNN(int(cfg["width"]), block_widths(cfg), int(cfg["convs_per_block"]),
                   float(cfg["dropout"]), float(cfg["head_scale"]), str(cfg["activation"]),
                   str(cfg["stem"]), bool(cfg["bn_scales"]), bool(cfg["dirac_init"]))
