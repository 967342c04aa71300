"""Config keys added after runs were first recorded, and what the older records mean by them.

A run's config.json, its checkpoint, a tuning round's plan and a study's name all hold a config as
a dict. A key added later is missing from those written before it; each entry of ADDED_KEYS is the
value that reproduces what those runs did. Filling it in (`with_added_keys`) lets an unfinished
older run be continued, its checkpoint accepted and its config reproduced; leaving such values out
(`without_legacy_values`) keeps the names hashed from a config (run folders, Optuna studies) as
they were for every config that does not use the new keys. The values equal the keys'
TRAIN_DEFAULTS in train.py (tests/test_train.py checks): a new recipe goes in a preset.
"""

from __future__ import annotations

from typing import Any

ADDED_KEYS: dict[str, Any] = {
    "tta_translate": False,  # issue 12: evaluation on the image and its mirror only
    "stem": "conv",  # issue 12: the 3x3 conv-BN stem
    "whiten_bias_epochs": 3,  # issue 12: read only with stem "whiten"
    "lookahead": False,  # issue 12: no weight averaging
    "lookahead_start": 0.3,  # issue 12: read only with lookahead
    "flip": "random",  # issue 12: a fresh random flip per image and epoch
    "block_widths": "",  # issue 12: blocks double from width
    "bn_scales": True,  # issue 12: batch norm scales train
    "bias_lr_scale": 1.0,  # issue 12: one learning rate for every parameter
    "crop_pad": 4,  # issue 12: the random crop's zero padding
    "train_sizes": "",  # issue 12: every epoch at 32x32
    "dirac_init": False,  # issue 12: PyTorch's default init for every conv
    "cutout": 0,  # issue 12: no square blanked out of training images
}


def with_added_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with every added key it lacks, at the value older runs had in effect."""
    return {**ADDED_KEYS, **cfg}


def without_legacy_values(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` without the added keys that hold their legacy value: what a config recorded before
    those keys existed would have been."""
    return {key: value for key, value in cfg.items()
            if not (key in ADDED_KEYS and _same(value, ADDED_KEYS[key]))}


def _same(a: Any, b: Any) -> bool:
    # 0 == False and 1 == 1.0 in Python; a config value of another type is not the legacy one.
    return type(a) is type(b) and a == b
