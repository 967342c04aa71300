"""What a training run records and how recorded runs are read back: the lineage, --reproduce,
configs written before keys were added, and the hashed names of the presets' runs and studies."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import train
from ct.trainer import config
from network import build_model
from tests.train_cli import QUICK, only_run_dir, run, unfinished_run

SMALL = [*QUICK, "--subset", "300"]
LINEAGE_KEYS = {"dataset_sha256", "dataset_form", "data_version", "test_version", "data", "seed",
                "commit", "code_sha256", "train_args", "image", "image_id", "torch", "device",
                "threads", "model_sha256"}


def sha256_of(*paths: Path) -> str:
    import hashlib

    return hashlib.sha256(b"".join(p.read_bytes() for p in paths)).hexdigest()


def test_lineage_is_recorded_and_the_dataset_hash_cached(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CT_IMAGE", "ct-cifar-train:0123abcd")
    monkeypatch.setenv("CT_IMAGE_ID", "sha256:feed")
    monkeypatch.setenv("CT_COMMIT", "c0ffee")
    monkeypatch.setenv("CT_CODE_SHA256", "e" * 64)
    ws = tmp_path / "ws"
    args = ["--out", ws, "--data-dir", tiny_cifar_root, *SMALL, "--seed", "3"]
    status, out, _ = run(args, capsys)
    assert status == 0, out
    metrics = json.loads((ws / "metrics.json").read_text())
    lineage = metrics["lineage"]
    assert set(lineage) == LINEAGE_KEYS
    assert json.loads((ws / metrics["run_dir"] / "metrics.json").read_text())["lineage"] == lineage
    folder = tiny_cifar_root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    assert lineage["dataset_sha256"] == sha256_of(*(folder / n for n in names))
    assert lineage["dataset_form"] == "folder"
    assert lineage["model_sha256"] == sha256_of(ws / metrics["model"])
    assert (lineage["seed"], lineage["commit"], lineage["code_sha256"]) == (3, "c0ffee", "e" * 64)
    assert (lineage["image"], lineage["image_id"]) == ("ct-cifar-train:0123abcd", "sha256:feed")
    assert lineage["torch"] == torch.__version__ and lineage["device"] == metrics["device"]
    assert lineage["threads"] == torch.get_num_threads()
    assert re.search(r"dataset sha256 [0-9a-f]{16} \(hashed in", out)

    cache = ws / "data" / "cifar-10-sha256.json"
    before = cache.stat().st_mtime_ns
    monkeypatch.delenv("CT_IMAGE")
    status, out, _ = run([*args, "--fresh"], capsys)
    assert status == 0, out
    assert f"dataset sha256 {lineage['dataset_sha256'][:16]} (cached)" in out
    assert cache.stat().st_mtime_ns == before, "the second run does not hash again"
    second = json.loads((ws / "metrics.json").read_text())["lineage"]
    assert second["dataset_sha256"] == lineage["dataset_sha256"]
    assert (second["image"], second["image_id"]) == ("local", "local")


def test_reproduce_trains_the_recorded_run_again_in_a_new_folder(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ws = tmp_path / "ws"
    data = ["--data-dir", tiny_cifar_root]
    assert run(["--out", ws, *data, *SMALL, "--seed", "5", "--dropout", "0.1"], capsys)[0] == 0
    original = only_run_dir(ws)
    before = {p: p.read_bytes() for p in original.iterdir() if p.is_file()}
    top = {p: p.read_bytes() for p in (ws / "accuracy.txt", ws / "metrics.json")}
    status, out, err = run(["--out", ws, *data, "--reproduce", original.name], capsys)
    assert status == 0, err
    (line,) = [x for x in out.splitlines() if x.startswith("reproduced ")]
    recorded = json.loads((original / "metrics.json").read_text())
    assert f"{recorded['accuracy']:.2f}% vs recorded {recorded['accuracy']:.2f}%" in line
    assert "(difference 0.00 points; exact: same CPU, torch and threads)" in line, line
    (again,) = [d for d in ws.glob("runs/train-*") if d != original]
    assert f"reproduced {original.name} as {again.name}:" in line
    assert {p: p.read_bytes() for p in original.iterdir() if p.is_file()} == before
    assert {p: p.read_bytes() for p in top} == top, "the top-level results stay as they were"
    metrics = json.loads((again / "metrics.json").read_text())
    assert metrics["reproduces"] == original.name and metrics["config"] == recorded["config"]
    assert metrics["test_loss"] == recorded["test_loss"]


def test_reproduce_says_when_an_exact_match_is_not_expected() -> None:
    from ct.trainer.lineage import reproduction_line

    recorded = {"torch": "2.13.0", "device": "cpu (fp32, 4 threads)", "threads": 4,
                "dataset_sha256": "a" * 64, "commit": "abc"}
    now = {**recorded, "torch": "2.14.1", "device": "cpu (fp32, 2 threads)", "threads": 2}
    line = reproduction_line("train-1", "train-2", 80.1, 81.27, recorded, now, "cpu")
    assert "difference -1.17 points; an exact match is not expected: torch 2.13.0 vs 2.14.1" in line
    assert "threads 4 vs 2 now" in line
    assert "no lineage" in reproduction_line("train-1", "train-2", 81.27, 81.27, None, now, "cpu")


def test_reproduce_refuses_what_it_cannot_reproduce(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ws = tmp_path / "ws"
    tune = ws / "runs" / "tune-20250101-000000-abc"
    tune.mkdir(parents=True)
    (tune / "config.json").write_text('{"base": {}, "trials": 2}')
    (tune / "metrics.json").write_text('{"mode": "tune", "accuracy": 80.0}')
    base = ["--out", ws, "--data-dir", tiny_cifar_root]
    other_version = ws / "runs" / "train-20250101-000000-def"
    other_version.mkdir()
    (other_version / "config.json").write_text('{"epochs": 2, "lr": 0.1}')
    (other_version / "metrics.json").write_text('{"mode": "train", "accuracy": 80.0}')
    for extra, message in ((["--reproduce", "train-nope"], "no run 'train-nope'"),
                           (["--reproduce", "../ws"], "no run '../ws'"),
                           (["--reproduce", tune.name], "tuning round"),
                           (["--reproduce", tune.name, "--epochs", "2"], "drop --epochs"),
                           (["--reproduce", other_version.name],
                            "config.json lacks activation, arch, augment")):
        status, _, err = run([*base, *extra], capsys)
        assert status == 2, (extra, err)
        (line,) = err.strip().splitlines()
        assert line.startswith("train.py: error:") and message in line, line
    assert len(list((ws / "runs").iterdir())) == 2, "nothing was trained"


# --- airbench's levers: resume, and configs recorded without their keys ------------------------


def test_legacy_values_come_back_exactly_as_they_were_left_out() -> None:
    """A config with the added keys left out at their legacy values, then filled back in, is the
    config again, for every preset; a value of another type than the legacy one is kept (1 is
    not 1.0, 0 is not False), so no config loses a key it set."""
    assert set(config.ADDED_KEYS) <= set(config.PLAIN_RECIPE) & set(config.CONFIG_HELP)
    assert not set(config.ADDED_KEYS) & set(config.without_legacy_values(config.PLAIN_RECIPE))
    for name in config.PRESETS:
        cfg = config.preset_config(name)
        assert config.with_added_keys(config.without_legacy_values(cfg)) == cfg, name
    odd = {**config.PLAIN_RECIPE, "bias_lr_scale": 1, "cutout": False}
    assert config.without_legacy_values(odd)["bias_lr_scale"] == 1
    assert config.without_legacy_values(odd)["cutout"] is False


def test_hashed_names_ignore_added_keys_at_legacy_values() -> None:
    from ct.trainer import study

    plain = config.PLAIN_RECIPE
    old = {k: v for k, v in plain.items() if k not in config.ADDED_KEYS}
    assert config.config_hash(plain) == config.config_hash(old)
    name = study.study_name(plain, ["sgd"], 24, "d" * 64, 100)
    assert name == study.study_name(old, ["sgd"], 24, "d" * 64, 100)
    assert name != study.study_name({**plain, "lookahead": True}, ["sgd"], 24, "d" * 64, 100)


# The run folders' and studies' hashes of each preset: a change would orphan every unfinished run
# and start every study afresh. The default's changed on purpose with its test-time views: with
# tta_translate_margin 0.3 (before: 88914f9a70, cifar10-9612e3061aae), then with tta_margin 0.8
# (before: 10cc7e6eed, cifar10-cf5276216d3d). The fast preset's changed with its recipe (ReLU,
# 20/26/32, batches of 256, shifted views; before: 50c516fbbf, cifar10-2959e51009d8).
HASHED_NAMES = {
    "default": ("4b9c5bd9a2", "cifar10-1c413cdae948"),
    "fast": ("2f93657189", "cifar10-830fc93519c8"),
    "gpu": ("7acee6a89b", "cifar10-5b6dc13fef85"),
    "original": ("1fb2928598", "cifar10-54bad21bef21"),
    "plain": ("0b04b86d12", "cifar10-721ae5fc7671"),
}


def test_the_presets_hashed_names_stay_as_they_are() -> None:
    from ct.trainer import study

    assert set(HASHED_NAMES) == set(config.PRESETS)
    for name, (run_hash, study_name) in HASHED_NAMES.items():
        cfg = config.preset_config(name)
        assert config.config_hash(cfg) == run_hash, name
        assert study.study_name(cfg, ["sgd", "adam", "adamw"], 24, "d" * 64, 5000) == study_name


# A run recorded before the added keys existed ran them at their legacy values: the plain recipe.
PLAIN = ["--preset", "plain"]


def _strip_added_keys(run_dir: Path) -> None:
    """Make a run look recorded before the added keys existed: none in its config or checkpoint."""
    recorded = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps(
        {k: v for k, v in recorded.items() if k not in config.ADDED_KEYS}))
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    ckpt["config"] = {k: v for k, v in ckpt["config"].items() if k not in config.ADDED_KEYS}
    ckpt.pop("lookahead")
    torch.save(ckpt, run_dir / "checkpoint.pt")


def test_an_unfinished_run_recorded_before_the_new_keys_is_continued(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ws = unfinished_run(tmp_path, tiny_cifar_root, capsys, *PLAIN)
    _strip_added_keys(only_run_dir(ws))
    status, out, err = run(["--out", ws, "--data-dir", tiny_cifar_root, *QUICK, *PLAIN], capsys)
    assert status == 0, err
    assert "resuming" in out and "after epoch 3" in out
    assert len(list(ws.glob("runs/train-*"))) == 1, "no new run folder"


def test_reproduce_fills_in_the_keys_an_older_config_lacks(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ws = tmp_path / "ws"
    data = ["--data-dir", tiny_cifar_root]
    assert run(["--out", ws, *data, *SMALL, *PLAIN], capsys)[0] == 0
    original = only_run_dir(ws)
    _strip_added_keys(original)
    status, out, err = run(["--out", ws, *data, "--reproduce", original.name], capsys)
    assert status == 0, err
    (line,) = [x for x in out.splitlines() if x.startswith("reproduced ")]
    assert "(difference 0.00 points; exact:" in line, line


@pytest.mark.parametrize("preset", sorted(config.PRESETS))
def test_every_preset_resolves_to_a_valid_config_and_a_working_net(preset: str) -> None:
    cfg = train.resolve_config(train.parse_args(["--preset", preset]))
    for key, value in config.PRESETS[preset].items():
        assert cfg[key] == value, f"--preset {preset} lost {key}"
    model = build_model(cfg).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
