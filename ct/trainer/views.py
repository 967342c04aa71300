"""The test-time views of an image and how their logits combine: the image, its mirror, and two
copies shifted by a pixel (airbench's tta_level 2). Each later view can be kept to the images the
earlier ones leave unsure (a margin): the mirror where the image alone is unsure, the shifted
copies where the image and its mirror are. A run's test (ct.trainer.engine.evaluate) and the
exported graph (ct.trainer.export, every view for every image) compute the views with these
functions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

TTA_SHIFT = 1  # pixels of the two shifted test views (reflect padding), as airbench's tta_level 2


def view_logits(model: nn.Module, inputs: torch.Tensor, flip_tta: bool,
                mirror_margin: float = 1.0) -> torch.Tensor:
    """The logits of one view, averaged with its mirror's when `flip_tta`: for every image with
    `mirror_margin` 1, else for the images the view alone leaves `unsure` by that margin. The
    mirror never changed the prediction of an image whose two likeliest classes lay 0.8 or more
    apart, on eight trained runs (docs/benchmarks.md)."""
    logits = model(inputs).float()
    if not flip_tta:
        return logits
    return _where_unsure(logits, mirror_margin,
                         lambda i: (logits[i] + model(inputs[i].flip(-1)).float()) / 2)


def unsure(logits: torch.Tensor, margin: float) -> torch.Tensor:
    """Which images' two likeliest classes under `logits` lie less than `margin` apart in
    probability."""
    top_two = logits.softmax(1).topk(2, dim=1).values
    return (top_two[:, 0] - top_two[:, 1]) < margin


def _where_unsure(logits: torch.Tensor, margin: float,
                  refined: Callable[[torch.Tensor | slice], torch.Tensor]) -> torch.Tensor:
    """`logits` with the images `unsure` by `margin` replaced by `refined(their index)`, the
    logits with a later view added; margin 1 refines the whole batch (index `:`), as one batch."""
    if margin >= 1:
        return refined(slice(None))
    chosen = unsure(logits, margin)
    if not bool(chosen.any()):
        return logits
    mixed = logits.clone()
    mixed[chosen] = refined(chosen)
    return mixed


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
    return _where_unsure(logits, margin,
                         lambda i: translated_logits(model, inputs[i], logits[i], flip_tta))
