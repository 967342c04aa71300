"""The test-time views of an image and how their logits combine: the image, its mirror, and two
copies shifted by a pixel (airbench's tta_level 2), the last only where the first views leave the
prediction unsure. A run's test (ct.trainer.engine.evaluate) and the exported graph
(ct.trainer.export) compute the same views with these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TTA_SHIFT = 1  # pixels of the two shifted test views (reflect padding), as airbench's tta_level 2


def view_logits(model: nn.Module, inputs: torch.Tensor, flip_tta: bool) -> torch.Tensor:
    """The logits of one view, averaged with its mirror's when `flip_tta`."""
    logits = model(inputs).float()
    if flip_tta:
        logits = (logits + model(inputs.flip(-1)).float()) / 2
    return logits


def translated_logits(model: nn.Module, inputs: torch.Tensor, logits: torch.Tensor,
                       flip_tta: bool) -> torch.Tensor:
    """airbench's infer_mirror_translate: half the weight on the image (`logits`, its view), a
    quarter each on the image shifted by TTA_SHIFT pixels up-left and down-right, cut from its
    reflect-padded copy (reflection invents no black border the training crops never had)."""
    size = inputs.shape[-1]
    padded = F.pad(inputs, (TTA_SHIFT,) * 4, mode="reflect")
    shifted = [padded[:, :, o:o + size, o:o + size].contiguous(memory_format=torch.channels_last)
               for o in (0, 2 * TTA_SHIFT)]
    views = [view_logits(model, view, flip_tta) for view in shifted]
    return 0.5 * logits + 0.25 * (views[0] + views[1])


def translated_where_unsure(model: nn.Module, inputs: torch.Tensor, logits: torch.Tensor,
                            flip_tta: bool, margin: float) -> torch.Tensor:
    """`translated_logits` for the images whose two likeliest classes under `logits` lie less
    than `margin` apart in probability; the others keep `logits`. The shifted views only ever
    changed the prediction of unsure images: on four trained runs (docs/benchmarks.md), margin
    0.3 shifted 14-39% of the test images and predicted every image as shifting all of them did,
    for a third to a half of the cost. Margin 1 shifts every image (airbench's tta_level 2)."""
    if margin >= 1:
        return translated_logits(model, inputs, logits, flip_tta)
    top_two = logits.softmax(1).topk(2, dim=1).values
    unsure = (top_two[:, 0] - top_two[:, 1]) < margin
    if not bool(unsure.any()):
        return logits
    mixed = logits.clone()
    mixed[unsure] = translated_logits(model, inputs[unsure], logits[unsure], flip_tta)
    return mixed
