"""The engine's pieces on their own: translated TTA views, Lookahead, the whitening stem's training
state, the optimizers, flips, crops, cutout and image sizes. Small tensors, no dataset."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ct.trainer.config import PLAIN_RECIPE, check_config, default_config, with_added_keys
from ct.trainer.engine import (
    EVAL_BATCH_CPU,
    LOOKAHEAD_DECAY,
    LOOKAHEAD_EVERY,
    OPTIMIZERS,
    Compute,
    Lookahead,
    evaluate,
    make_optimizer,
    normalise,
)
from ct.trainer.errors import UsageError
from ct.trainer.muon import MuonSGD
from ct.trainer.state import TrainingState
from ct.trainer.views import translated_logits, translated_where_unsure, view_logits
from network import build_model

CPU = Compute(torch.device("cpu"), None)


class Recorder(nn.Module):
    """A model that remembers every batch it was shown; its logits are the mean of each image
    per channel, padded to 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return F.pad(x.mean(dim=(2, 3)), (0, 7))


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
    return x, torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize(("flip", "forwards"), [(True, 6), (False, 3)])
def test_translated_tta_views(flip: bool, forwards: int) -> None:
    x, y = _batch()
    model = Recorder()
    accuracy, loss = evaluate(model, x, y, CPU, flip_tta=flip, translate=True)
    assert 0.0 <= accuracy <= 100.0 and math.isfinite(loss)
    assert len(model.seen) == forwards
    assert all(v.shape == (6, 3, 32, 32) for v in model.seen)
    image = model.seen[0]
    up_left, down_right = model.seen[forwards // 3], model.seen[2 * forwards // 3]
    # Reflect-pad 1, crops [0:32] and [2:34]: the image moved by one pixel each way.
    assert torch.equal(up_left[:, :, 1:, 1:], image[:, :, :-1, :-1])
    assert torch.equal(down_right[:, :, :-1, :-1], image[:, :, 1:, 1:])
    assert torch.equal(up_left[:, :, 0, 1:], image[:, :, 1, :-1]), "reflected, not zero, border"


def test_plain_tta_is_unchanged_by_the_translate_option() -> None:
    x, y = _batch()
    model = Recorder()
    assert evaluate(model, x, y, CPU) == evaluate(model, x, y, CPU, translate=False)
    assert len(model.seen) == 4, "image and mirror, twice"


def test_translated_tta_weights_are_airbench_s() -> None:
    """0.5 x the image's mirror average + 0.25 x each shifted one's (infer_mirror_translate)."""
    x, y = _batch(1)
    model = build_model({"width": 4}).eval()
    inputs = normalise(x)
    with torch.no_grad():
        def mirror(v: torch.Tensor) -> torch.Tensor:
            return (model(v) + model(v.flip(-1))) / 2

        padded = F.pad(inputs, (1,) * 4, mode="reflect")
        expected = (0.5 * mirror(inputs) + 0.25 * mirror(padded[:, :, :32, :32])
                     + 0.25 * mirror(padded[:, :, 2:, 2:]))
    _, loss = evaluate(model, x, y, CPU, translate=True)
    assert loss == pytest.approx(float(F.cross_entropy(expected, y)), rel=1e-5)


def test_shifted_views_go_only_to_the_images_left_unsure() -> None:
    """--tta-translate-margin M: the images whose two likeliest classes (image and mirror) lie
    less than M apart get the shifted views, the others keep the first views' logits; M = 1
    shifts every image, as airbench's tta_level 2."""
    x, _ = _batch(8)
    model = build_model({"width": 4}).eval()
    inputs = normalise(x)
    with torch.no_grad():
        first = view_logits(model, inputs, True)
        every = translated_logits(model, inputs, first, True)
        gaps = unsure_gaps(first)
        margin = float(gaps.median())
        unsure = gaps < margin
        mixed = translated_where_unsure(model, inputs, first, True, margin)
        assert torch.equal(translated_where_unsure(model, inputs, first, True, 1.0), every)
    assert 0 < int(unsure.sum()) < len(x)
    assert torch.equal(mixed[~unsure], first[~unsure])
    assert torch.allclose(mixed[unsure], every[unsure], atol=1e-5)


def test_the_margin_spares_the_sure_images_the_shifted_forwards() -> None:
    x, y = _batch(8)
    recorder = Recorder()
    evaluate(recorder, x, y, CPU, flip_tta=True, translate=True, translate_margin=1e-9)
    assert [len(v) for v in recorder.seen] == [8, 8], "no image is that unsure: 2 forwards"
    recorder = Recorder()
    evaluate(recorder, x, y, CPU, flip_tta=True, translate=True, translate_margin=1.0)
    assert [len(v) for v in recorder.seen] == [8] * 6


def test_the_mirror_goes_only_to_the_images_the_image_alone_leaves_unsure() -> None:
    """--tta-margin M: the images whose two likeliest classes on the image alone lie less than M
    apart are averaged with their mirror, the others keep the image's logits; M = 1 mirrors
    every image."""
    x, _ = _batch(8)
    model = build_model({"width": 4}).eval()
    inputs = normalise(x)
    with torch.no_grad():
        alone = view_logits(model, inputs, False)
        every = view_logits(model, inputs, True)
        margin = float(unsure_gaps(alone).median())
        unsure = unsure_gaps(alone) < margin
        mixed = view_logits(model, inputs, True, margin)
        assert torch.equal(view_logits(model, inputs, True, 1.0), every)
    assert 0 < int(unsure.sum()) < len(x)
    assert torch.equal(mixed[~unsure], alone[~unsure])
    assert torch.allclose(mixed[unsure], every[unsure], atol=1e-5)


def unsure_gaps(logits: torch.Tensor) -> torch.Tensor:
    top = logits.softmax(1).topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def test_the_mirror_margin_spares_the_sure_images_their_mirror() -> None:
    x, y = _batch(8)
    recorder = Recorder()
    evaluate(recorder, x, y, CPU, flip_tta=True, mirror_margin=1e-9)
    assert [len(v) for v in recorder.seen] == [8], "no image is that unsure: 1 forward"
    recorder = Recorder()
    evaluate(recorder, x, y, CPU, flip_tta=True, mirror_margin=1.0)
    assert [len(v) for v in recorder.seen] == [8, 8]
    assert torch.equal(recorder.seen[1], recorder.seen[0].flip(-1))


@pytest.mark.parametrize(("key", "flag", "preset_value"), [
    ("tta_translate_margin", "--tta-translate-margin", 0.3),
    ("tta_margin", "--tta-margin", 0.8),
])
def test_a_margin_is_checked_and_old_records_show_every_image_every_view(
        key: str, flag: str, preset_value: float) -> None:
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(UsageError, match=f"{flag} must be in"):
            check_config({**default_config(), key: bad})
    recorded = {k: v for k, v in default_config().items() if k != key}
    assert with_added_keys(recorded)[key] == 1.0
    assert default_config()[key] == preset_value


def test_evaluation_batches_cover_every_image_once() -> None:
    """The CPU evaluates in small batches (they stay in the caches), a GPU in big ones; either way
    each test image is seen once, the last batch partial, and the figures are the same as one
    batch of all the images gives."""
    n = 2 * EVAL_BATCH_CPU + 7
    x, y = _batch(n)
    model = Recorder()
    assert CPU.eval_batch == EVAL_BATCH_CPU < n <= Compute(torch.device("cuda"), None).eval_batch
    accuracy, loss = evaluate(model, x, y, CPU, flip_tta=False)
    assert [len(v) for v in model.seen] == [EVAL_BATCH_CPU, EVAL_BATCH_CPU, 7]
    assert torch.equal(torch.cat(model.seen), normalise(x))
    whole = F.pad(normalise(x).mean(dim=(2, 3)), (0, 7))
    assert accuracy == pytest.approx(100.0 * float((whole.argmax(1) == y).float().mean()))
    assert loss == pytest.approx(float(F.cross_entropy(whole, y)), rel=1e-5)


# --- Lookahead ---------------------------------------------------------------------------------


def test_lookahead_waits_for_its_start_then_averages_every_5_steps() -> None:
    model = build_model({"width": 4})
    look = Lookahead(total_steps=40, start_frac=0.25)  # starts at step 10
    for step in range(1, 10):
        look.after_step(model, step)
    assert look.average is None
    look.after_step(model, 10)
    assert look.average is not None
    before = {k: v.clone() for k, v in look.average.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    look.after_step(model, 12)  # not a multiple of LOOKAHEAD_EVERY: nothing happens
    assert all(torch.equal(look.average[k], before[k]) for k in before)
    look.after_step(model, 15)
    rho = LOOKAHEAD_DECAY ** LOOKAHEAD_EVERY * (15 / 40) ** 3
    weight = model.head.weight
    assert torch.allclose(look.average["head.weight"], before["head.weight"] + (1 - rho))
    assert torch.equal(weight, look.average["head.weight"]), "the net jumps to the average"
    tracked = [k for k in before if k.endswith("num_batches_tracked")]
    assert tracked and all(torch.equal(look.average[k], before[k]) for k in tracked)


def test_lookahead_end_of_epoch_makes_the_net_the_average() -> None:
    model = build_model({"width": 4})
    look = Lookahead(total_steps=10, start_frac=0.0)
    look.end_epoch(model)  # no average yet: nothing to do
    look.after_step(model, 5)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    look.end_epoch(model)
    assert look.average is not None
    assert torch.equal(model.head.weight, look.average["head.weight"])


# --- the whitening stem in the training state ----------------------------------------------------


def _whiten_cfg(**extra: object) -> dict:
    return {**PLAIN_RECIPE, "stem": "whiten", "width": 4, "epochs": 2,
            "batch_size": 16, **extra}


def test_whitening_init_is_deterministic_and_frozen_weights_are_not_optimised() -> None:
    x, _ = _batch(40)
    first = TrainingState.build(_whiten_cfg(), len(x), CPU, x)
    second = TrainingState.build(_whiten_cfg(), len(x), CPU, x.clone())
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name
    stem = first.model.features[0]
    optimised = [p for group in first.optimizer.param_groups for p in group["params"]]
    assert all(p is not stem.weight for p in optimised)
    assert any(p is stem.bias for p in optimised)
    assert len(optimised) == sum(1 for p in first.model.parameters()) - 1


def test_whiten_stem_needs_the_training_images() -> None:
    with pytest.raises(ValueError, match="train_x"):
        TrainingState.build(_whiten_cfg(), 40, CPU)


def test_whitening_bias_freezes_by_epoch_index() -> None:
    x, y = _batch(32)
    state = TrainingState.build(_whiten_cfg(whiten_bias_epochs=1), len(x), CPU, x)
    bias = state.model.features[0].bias
    before = bias.detach().clone()
    state.run_epoch(0, x, y, _whiten_cfg(whiten_bias_epochs=1), CPU)
    after_first = bias.detach().clone()
    assert not torch.equal(before, after_first), "epoch 0 trains the bias"
    state.run_epoch(1, x, y, _whiten_cfg(whiten_bias_epochs=1), CPU)
    assert torch.equal(bias, after_first), "from epoch 1 on the bias is frozen"


def test_the_plain_recipes_optimizer_holds_every_parameter_in_one_group() -> None:
    model = build_model({"width": 4})
    optimizer = make_optimizer(model, PLAIN_RECIPE)
    (group,) = optimizer.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]


def test_every_listed_optimizer_is_built_and_no_other() -> None:
    model = build_model({"width": 4})
    built = {name: make_optimizer(model, {**PLAIN_RECIPE, "optimizer": name})
             for name in OPTIMIZERS}
    assert {name: type(o) for name, o in built.items()} == {
        "sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
        "muon": MuonSGD}
    assert built["sgd"].defaults["nesterov"] and built["sgd"].defaults["momentum"] == 0.9
    with pytest.raises(ValueError, match="use sgd, adam, adamw, muon"):
        make_optimizer(model, {**PLAIN_RECIPE, "optimizer": "rmsprop"})


# --- alternating flip ---------------------------------------------------------------------------


def test_alternating_flips_mirror_every_image_every_other_epoch() -> None:
    from ct.trainer.engine import alternating_flips, flips_for_epoch

    base = alternating_flips(seed=3, n_train=1000, device=torch.device("cpu"))
    assert torch.equal(base, alternating_flips(3, 1000, torch.device("cpu"))), "from the seed"
    assert 400 < int(base.sum()) < 600, "a random orientation per image"
    assert torch.equal(flips_for_epoch(base, 0), base)
    assert torch.equal(flips_for_epoch(base, 1), ~base)
    assert torch.equal(flips_for_epoch(base, 2), base)


def test_given_flips_mirror_exactly_those_images_and_leave_the_crops_as_drawn() -> None:
    from ct.trainer.engine import augment

    x, _ = _batch()
    flips = torch.tensor([True, False, True, False, False, True])
    drawn = augment(x, torch.Generator().manual_seed(0))
    given = augment(x, torch.Generator().manual_seed(0), flips)
    unflipped = augment(x, torch.Generator().manual_seed(0), torch.zeros(6, dtype=torch.bool))
    assert torch.equal(given[flips], unflipped[flips].flip(-1))
    assert torch.equal(given[~flips], unflipped[~flips])
    assert drawn.shape == given.shape


def test_crop_pad_zero_only_flips() -> None:
    from ct.trainer.engine import augment

    x, _ = _batch()
    flips = torch.tensor([True, False, True, False, False, True])
    out = augment(x, torch.Generator().manual_seed(0), flips, crop_pad=0)
    assert torch.equal(out[flips], x[flips].flip(-1))
    assert torch.equal(out[~flips], x[~flips])
    drawn = augment(x, torch.Generator().manual_seed(0), crop_pad=0)
    assert all(torch.equal(d, i) or torch.equal(d, i.flip(-1))
               for d, i in zip(drawn, x, strict=True))


@pytest.mark.parametrize("pad", [1, 4])
def test_crops_shift_by_at_most_the_padding(pad: int) -> None:
    """Every augmented image is the original shifted by at most `pad` pixels (zeros around)."""
    from ct.trainer.engine import augment

    x, _ = _batch()
    out = augment(x, torch.Generator().manual_seed(3), torch.zeros(6, dtype=torch.bool), pad)
    padded = F.pad(x, (pad,) * 4)
    for image, original in zip(out, padded, strict=True):
        found = [(r, c) for r in range(2 * pad + 1) for c in range(2 * pad + 1)
                 if torch.equal(original[:, r:r + 32, c:c + 32], image)]
        assert found, "each crop is a window of the padded image"


@pytest.mark.parametrize(("side", "size"), [(32, 12), (24, 8), (8, 12)])
def test_cutout_blanks_one_whole_square_per_image(side: int, size: int) -> None:
    """airbench96's batch_cutout: in each image one size x size square (the whole image when it
    is smaller), in every channel, is set to 0 (the mean, once normalised); nothing else moves."""
    from ct.trainer.engine import cutout

    x = torch.rand(16, 3, side, side) + 0.5  # no pixel is 0 before
    out = cutout(x, torch.Generator().manual_seed(1), size)
    blanked = out == 0
    assert torch.equal(blanked[:, :1].expand_as(blanked), blanked), "all channels alike"
    side_of_square = min(size, side)
    for mask in blanked[:, 0]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert len(rows) == len(cols) == side_of_square, "one square of the asked side"
        assert int(mask.sum()) == side_of_square ** 2, "filled, not scattered"
    assert torch.equal(out[~blanked], x[~blanked])
    again = cutout(x, torch.Generator().manual_seed(1), size)
    assert torch.equal(again, out), "the generator decides"


# --- a smaller image size in early epochs ------------------------------------------------------


def test_train_sizes_name_each_epochs_size_and_the_last_repeats() -> None:
    from ct.trainer.engine import size_for_epoch, train_sizes

    assert [size_for_epoch("24,32", epoch) for epoch in range(4)] == [24, 32, 32, 32]
    assert [size_for_epoch("16, 24", epoch) for epoch in range(3)] == [16, 24, 24]
    assert size_for_epoch("", 5) is None
    assert train_sizes("") == []
    for bad in ("40", "24,,32", "a", "4", "24;32"):
        with pytest.raises(ValueError, match="train_sizes"):
            train_sizes(bad)


class TrainableRecorder(Recorder):
    """A Recorder with one weight, so that a training step has something to train."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.gain


@pytest.mark.parametrize("size", [16, 24])
def test_an_epoch_at_a_smaller_size_shows_the_net_downscaled_images(size: int) -> None:
    from ct.trainer.engine import downscale, train_epoch

    x, y = _batch()
    model = TrainableRecorder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    cfg = {**PLAIN_RECIPE, "batch_size": 6, "augment": False}
    train_epoch(model, optimizer, schedule, x, y, cfg, torch.Generator().manual_seed(0), CPU,
                size=size)
    order = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    assert model.seen[0].shape == (6, 3, size, size)
    assert torch.equal(model.seen[0], normalise(downscale(x[order], size)))
    assert not torch.equal(downscale(x, size), F.interpolate(x.float(), size=(size, size))), \
        "antialiased, not nearest pixels"


# --- batch norm: fixed scales, a learning rate of their own for the shifts ----------------------


def test_fixed_bn_scales_stay_one_and_take_no_optimizer_state() -> None:
    cfg = {**PLAIN_RECIPE, "width": 4, "bn_scales": False}
    model = build_model(cfg)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    optimizer = make_optimizer(model, cfg)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert norms and all(id(n.weight) not in held and id(n.bias) in held for n in norms)
    x, y = _batch(8)
    F.cross_entropy(model(normalise(x)), y).backward()
    optimizer.step()
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in norms)


def test_bias_lr_scale_gives_bn_shifts_their_own_group() -> None:
    cfg = {**PLAIN_RECIPE, "width": 4, "bias_lr_scale": 64.0}
    model = build_model(cfg)
    plain, shifts = make_optimizer(model, cfg).param_groups
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {id(p) for p in shifts["params"]} == {id(n.bias) for n in norms}
    assert shifts["lr"] == cfg["lr"] * 64 and shifts["weight_decay"] == cfg["weight_decay"] / 64
    assert plain["lr"] == cfg["lr"] and len(plain["params"]) + len(norms) == len(
        list(model.parameters()))
