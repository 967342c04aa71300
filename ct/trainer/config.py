"""The trainer's configs: the plain recipe that every preset overrides, the presets, each key's help
line, validation, and how a config recorded before some of its keys existed is read.

A config is a flat dict whose every key is also a train.py flag (--batch-size for batch_size). A
run takes the plain recipe, then its preset's overrides (`preset_config`), then its flags;
`python train.py` without flags runs `default_config()`, the preset named "default".

Runs keep their config as a dict (config.json, the checkpoint, a tuning round's plan), and names
are hashed from configs (run folders: `config_hash`; Optuna studies: ct.trainer.study). A key
added after runs were first recorded is missing from their records; those runs did what the plain
recipe's value of that key does. So `with_added_keys` fills a recorded config in (an unfinished
run is continued, its checkpoint accepted, its config reproduced), and `without_legacy_values`
leaves such values out of what is hashed, keeping every hashed name as it was for configs that
do not use the added keys.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ct.trainer.engine import OPTIMIZERS, train_sizes
from ct.trainer.errors import UsageError
from network import NET_HELP, PLAIN_NET, check_net_config

# The plain recipe: the base that every preset overrides (`--preset plain` is this alone), and
# the meaning of a record that lacks one of ADDED_KEYS: runs recorded before such a key existed
# did what its value here does. Changing a value here would change those runs' meaning and the
# names hashed from them, so a better recipe goes into PRESETS, never here. Figures are for the
# JPEG-re-encoded CIFAR-10 copy, which runs 2-3 points below the original.
PLAIN_RECIPE: dict[str, Any] = {
    "epochs": 18,  # 87.23% in about 5 minutes on 2 EPYC cores with bf16
    "batch_size": 512,
    "optimizer": "sgd",
    "lr": 0.4,
    "muon_lr": 0.12,  # with --optimizer muon only; 0.08 and 0.16 did worse (11 default epochs)
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "label_smoothing": 0.2,  # softer targets: faster, better calibrated training on short budgets
    "warmup_frac": 0.2,
    "lr_schedule": "onecycle",
    "augment": True,
    "tta": True,
    # airbench94's levers, off here; the presets turn them on (README "Benchmarks").
    "flip": "random",
    "tta_translate": False,
    "tta_margin": 1.0,  # 1: the mirror for every image
    "tta_translate_margin": 1.0,  # 1: the shifted views for every image
    "crop_pad": 4,
    "cutout": 0,
    "train_sizes": "",  # e.g. "24,32": the first epoch on 24x24 images, 56% of the pixels
    "bias_lr_scale": 1.0,  # airbench: 64, with --bn-scales no
    "whiten_bias_epochs": 3,  # airbench's value
    "lookahead": False,
    "lookahead_start": 0.3,  # airbench starts averaging after 3 of its 9.9 epochs
    "seed": 0,
    "subset": 0,
    "val_split": 0,  # tuning holds out its own validation split
    **PLAIN_NET,
}


def _either(choices: tuple[str, ...]) -> str:
    """("a", "b", "c") -> "a, b or c", for help lines and messages."""
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]


# One line per key for train.py --help, which adds the key's value in default_config().
CONFIG_HELP: dict[str, str] = {
    "epochs": "passes over the training images",
    "batch_size": "images per training step",
    "optimizer": f"{_either(OPTIMIZERS)}; sgd uses Nesterov momentum, muon (Muon for the "
                 "convolution filters, SGD for the rest) too",
    "lr": "peak learning rate",
    "muon_lr": "with --optimizer muon: the convolution filters' peak step, as a share of their "
               "norm (held fixed); --lr drives the other weights by SGD",
    "momentum": "SGD momentum; 0 for plain SGD",
    "weight_decay": "L2 penalty on the weights",
    "label_smoothing": "share of each target spread over the other classes, in [0, 1)",
    "warmup_frac": "share of the steps spent warming the learning rate up, in [0, 1]",
    "lr_schedule": "onecycle (linear warm-up, then linear decay to 0) or constant",
    "augment": "random crop (--crop-pad) and horizontal flip, batched on the device",
    "crop_pad": "pixels of zero padding the random crop may shift by (0: flips only; short runs "
                "learn faster with less augmentation)",
    "cutout": "side in pixels of a square set to the mean in each training image (0: none; "
              "airbench96's 12 against overfitting in long GPU runs)",
    "tta": "evaluate on each image and its mirror",
    "flip": "random (a fresh draw per image and epoch) or alternate (one random orientation per "
            "image, mirrored every other epoch, as airbench)",
    "train_sizes": "image size of each epoch, a comma list whose last entry repeats (e.g. 24,32: "
                   "epoch 1 on images downscaled to 24x24, the rest at 32); empty: 32 throughout",
    "bias_lr_scale": "factor on the learning rate of the batch norms' shifts (their weight "
                     "decay divided by it), as airbench's 64",
    "tta_margin": "with --tta: mirror only the images whose two likeliest classes on the image "
                  "alone are less than this apart in probability, in (0, 1]; 1: every image",
    "tta_translate": "also evaluate on two copies shifted by 1 pixel (reflect padding), weighted "
                     "1/4 each against 1/2 for the image (airbench's tta_level 2)",
    "tta_translate_margin": "with --tta-translate: shift only the images whose two likeliest "
                            "classes (image and mirror) are less than this apart in "
                            "probability, in (0, 1]; 1: every image",
    "whiten_bias_epochs": "with --stem whiten: epochs the whitening bias trains before it freezes",
    "lookahead": "every 5 steps pull an average of the weights toward the net and the net back "
                 "to it, harder as training ends; the net is the average after each epoch "
                 "(airbench's LookaheadState)",
    "lookahead_start": "share of the steps done before --lookahead starts averaging, in [0, 1)",
    "seed": "seed of every random draw (weights, batch order, augmentation)",
    "subset": "use only the first N training images (0: all)",
    "val_split": "hold out the last N training images for validation instead of testing",
    **NET_HELP,
}

# Named sets of overrides of PLAIN_RECIPE (docs/benchmarks.md has every figure and lever).
# "default" is what `python train.py` runs: airbench's levers and Muon on a 15-epoch recipe with
# wider blocks, the first 4 epochs on 24x24 images (89.54-89.95% over 3 seeds on the 2-core
# EPYC, where the same recipe with SGD gave 89.25% and 18 epochs of the plain recipe 87%).
# "plain" is PLAIN_RECIPE alone. "fast" is the time-to-80% recipe: 2 epochs, at 24x24 then
# 32x32, in batches of 256, Muon, ReLU, no crops (too few epochs to profit from them), the same
# levers, and the shifted test views for the unsure images (81.96-82.27% over 3 seeds at
# 1.26 units of training, where its 3-epoch SGD predecessor took 1.53-1.66 for 81.88%; units
# of before the allocator setting, which made the unit cheaper: 1.48-1.51 units since).
# "original" is the recipe this project started from, the benchmark's baseline.
DEFAULT_PRESET = "default"
PRESETS: dict[str, dict[str, Any]] = {
    DEFAULT_PRESET: {"epochs": 15, "optimizer": "muon", "block_widths": "32,128,128",
                     "train_sizes": "24,24,24,24,32", "crop_pad": 2, "stem": "whiten",
                     "dirac_init": True, "flip": "alternate", "lr": 0.8, "lookahead": True,
                     "label_smoothing": 0.1, "tta_translate": True,
                     "tta_margin": 0.8, "tta_translate_margin": 0.3},
    "plain": {},
    "fast": {"epochs": 2, "batch_size": 256, "optimizer": "muon", "warmup_frac": 0.1,
             "width": 16, "blocks": 3, "convs_per_block": 2, "activation": "relu",
             "train_sizes": "24,32", "crop_pad": 0, "stem": "whiten", "dirac_init": True,
             "flip": "alternate", "lr": 0.8, "tta_translate": True, "tta_translate_margin": 0.3},
    # The most accurate GPU recipe measured (README "Benchmarks", H200): airbench96's widths,
    # 40 epochs, 91.63% mean over 3 seeds; every recipe tried on the JPEG copy ended at 91-92%.
    "gpu": {"epochs": 40, "convs_per_block": 3, "block_widths": "128,384,512",
            "stem": "whiten", "dirac_init": True, "flip": "alternate", "tta_translate": True},
    "original": {"arch": "original", "optimizer": "sgd", "lr": 0.001, "momentum": 0.0,
                 "weight_decay": 0.0, "batch_size": 20, "label_smoothing": 0.0,
                 "lr_schedule": "constant", "augment": False, "tta": False, "epochs": 30},
}


def preset_config(name: str) -> dict[str, Any]:
    """PLAIN_RECIPE with the overrides of preset `name`: a run's config before its flags."""
    return {**PLAIN_RECIPE, **PRESETS[name]}


def default_config() -> dict[str, Any]:
    """The config of `python train.py` without flags: the default preset over the plain recipe."""
    return preset_config(DEFAULT_PRESET)


def check_config(cfg: dict[str, Any]) -> None:
    """UsageError naming the flag of the first value out of its range."""
    checks = [
        (cfg["epochs"] > 0, f"--epochs must be at least 1, not {cfg['epochs']}"),
        (cfg["lr"] > 0, f"--lr must be positive, not {cfg['lr']}"),
        (cfg["muon_lr"] > 0, f"--muon-lr must be positive, not {cfg['muon_lr']}"),
        (cfg["batch_size"] > 0, f"--batch-size must be at least 1, not {cfg['batch_size']}"),
        (cfg["optimizer"] in OPTIMIZERS,
         f"--optimizer must be {_either(OPTIMIZERS)}, not {cfg['optimizer']!r}"),
        (cfg["subset"] >= 0, f"--subset must be 0 (all) or positive, not {cfg['subset']}"),
        (cfg["val_split"] >= 0, f"--val-split must be 0 or positive, not {cfg['val_split']}"),
        (0 <= cfg["label_smoothing"] < 1, "--label-smoothing must be in [0, 1)"),
        (0 <= cfg["warmup_frac"] <= 1, "--warmup-frac must be in [0, 1]"),
        (cfg["lr_schedule"] in ("onecycle", "constant"),
         f"--lr-schedule must be onecycle or constant, not {cfg['lr_schedule']!r}"),
        (cfg["momentum"] >= 0 and cfg["weight_decay"] >= 0,
         "--momentum and --weight-decay must not be negative"),
        (cfg["flip"] in ("random", "alternate"),
         f"--flip must be random or alternate, not {cfg['flip']!r}"),
        (0 <= cfg["crop_pad"] <= 8, f"--crop-pad must be in 0..8, not {cfg['crop_pad']}"),
        (0 <= cfg["cutout"] <= 32, f"--cutout must be in 0..32, not {cfg['cutout']}"),
        (cfg["bias_lr_scale"] > 0, f"--bias-lr-scale must be positive, not {cfg['bias_lr_scale']}"),
        (cfg["whiten_bias_epochs"] >= 0,
         f"--whiten-bias-epochs must be 0 or positive, not {cfg['whiten_bias_epochs']}"),
        (0 <= cfg["lookahead_start"] < 1, "--lookahead-start must be in [0, 1)"),
        (0 < cfg["tta_margin"] <= 1, "--tta-margin must be in (0, 1]"),
        (0 < cfg["tta_translate_margin"] <= 1, "--tta-translate-margin must be in (0, 1]"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    try:
        train_sizes(cfg["train_sizes"])
        check_net_config(cfg)
    except ValueError as exc:  # "block_widths must ..." -> "--block-widths must ..."
        key, reason = str(exc).split(" ", 1)
        raise UsageError(f"--{key.replace('_', '-')} {reason}") from exc


# --- configs recorded before some keys existed ------------------------------------------------

# The keys added after runs were first recorded. Their legacy values, what a record without them
# means, are PLAIN_RECIPE's.
ADDED_KEYS: tuple[str, ...] = (
    "tta_translate", "stem", "whiten_bias_epochs", "lookahead", "lookahead_start", "flip",
    "block_widths", "bn_scales", "bias_lr_scale", "crop_pad", "train_sizes", "dirac_init",
    "cutout", "tta_translate_margin", "tta_margin", "muon_lr",
)


def legacy_values() -> dict[str, Any]:
    """Each added key at the value that records without it had in effect."""
    return {key: PLAIN_RECIPE[key] for key in ADDED_KEYS}


def with_added_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with every added key it lacks, at the value older runs had in effect."""
    return {**legacy_values(), **cfg}


def without_legacy_values(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` without the added keys that hold their legacy value: what a config recorded before
    those keys existed would have been."""
    legacy = legacy_values()
    return {key: value for key, value in cfg.items()
            if not (key in legacy and _same(value, legacy[key]))}


def _same(a: Any, b: Any) -> bool:
    # 0 == False and 1 == 1.0 in Python; a config value of another type is not the legacy one.
    return type(a) is type(b) and a == b


def config_hash(cfg: dict[str, Any]) -> str:
    """The short hash in a run folder's name; added keys at their legacy values leave it as it
    is for the same config recorded without them."""
    return hashlib.sha256(json.dumps(without_legacy_values(cfg), sort_keys=True).encode()
                          ).hexdigest()[:10]
