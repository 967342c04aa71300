"""A fair champion: promotion compares a run with the best model on the run's own test set. An
increment with test images changes the test set (data_version.test_version); the best model is
then re-scored there (python -m ct.trainer.evaluate, runs/eval-*) before the comparison, and its
scores per test set are kept in best.json; numbers from different test sets are never compared."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ct import data_version
from ct.pipeline import promote as promotion
from ct.pipeline import rescore
from tests.conftest import REPO, read_props, run_script
from tests.gate_workspace import COMMIT, make_workspace, run_module, snapshot, write_run

T0 = hashlib.sha256(b"the base test set").hexdigest()
T1 = hashlib.sha256(b"the base and an increment's test images").hexdigest()
CLASSES = list(data_version.CLASSES)


def per_class(cat: float, rest: float = 70.0) -> dict[str, float]:
    return {name: (cat if name == "cat" else rest) for name in CLASSES}


def set_metrics(ws: Path, **fields: Any) -> dict[str, Any]:
    metrics = json.loads((ws / "metrics.json").read_text()) | fields
    (ws / "metrics.json").write_text(json.dumps(metrics))
    (ws / "accuracy.txt").write_text(f"{metrics['accuracy']}\n")
    return metrics


def champion(tmp_path: Path, accuracy: float, cat: float = 70.0) -> Path:
    """A workspace whose best model (run champ, commit COMMIT) was promoted with `accuracy` on
    test set T0; its latest run is then a challenger measured on T1 (challenger())."""
    ws = make_workspace(tmp_path / "ws", accuracy, run_id="champ", model_bytes=b"champion")
    set_metrics(ws, test_version=T0, classes=CLASSES, per_class_accuracy=per_class(cat))
    assert promotion.promote(ws, env={}).promoted
    return ws


def challenger(ws: Path, accuracy: float, test_version: str = T1, cat: float = 70.0) -> None:
    write_run(ws, accuracy, run_id="chall", model_bytes=b"challenger")
    set_metrics(ws, test_version=test_version, classes=CLASSES,
                per_class_accuracy=per_class(cat))


def evaluation(ws: Path, accuracy: float, test_version: str = T1, cat: float = 70.0,
               name: str = "eval-20250102-030405-0123456789", model: bytes = b"champion"
               ) -> str:
    """What ct.trainer.evaluate leaves: the champion (by its bytes' sha256) on a test set."""
    folder = ws / "runs" / name
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "mode": "eval", "run_id": name, "model_sha256": hashlib.sha256(model).hexdigest(),
        "accuracy": accuracy, "per_class_accuracy": per_class(cat), "classes": CLASSES,
        "test_version": test_version, "data_version": test_version,
        "finished_at": "2025-01-02T03:04:05+00:00"}))
    return name


def best_of(ws: Path) -> dict[str, Any]:
    return json.loads((ws / "best.json").read_text())


# ---------------------------------------------------------------- the test set's identity


def image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_the_test_version_names_the_test_images_alone(tiny_cifar: Path) -> None:
    def versions() -> tuple[str, str]:
        dv = data_version.compute(tiny_cifar)
        return dv.version, data_version.test_version(dv)

    base_version, base_test = versions()
    assert base_test == base_version == data_version.version_of(
        data_version.compute(tiny_cifar).base_sha256, [])
    image(tiny_cifar / "increments" / "a" / "train" / "cat" / "x.png", 1)
    trained_more, same_test = versions()
    assert trained_more != base_version and same_test == base_test  # training images only
    image(tiny_cifar / "increments" / "a" / "test" / "dog" / "y.png", 2)
    _, new_test = versions()
    assert new_test != base_test
    (tiny_cifar / "increments" / "a").rename(tiny_cifar / "increments" / "renamed")
    assert versions()[1] == new_test  # names do not count, the images do
    shutil.move(tiny_cifar / "increments" / "renamed" / "test" / "dog",
                tiny_cifar / "increments" / "renamed" / "test" / "cat")
    assert versions()[1] not in (new_test, base_test)  # a relabelled test image: another set


def test_records_from_before_test_versions_name_their_test_set_when_they_can() -> None:
    base = "d" * 64
    derived = data_version.version_of(base, [])
    no_increment_tests = {"dataset_sha256": base, "data_version": "v",
                          "data": {"increment_test": 0, "increment_train": 5}}
    assert rescore.test_version_of({"lineage": no_increment_tests}) == derived
    assert rescore.test_version_of({"lineage": {"dataset_sha256": base}}) == derived  # pre-data
    tested = {**no_increment_tests, "data": {"increment_test": 3}}
    assert rescore.test_version_of({"lineage": tested}) is None  # which images: unknown
    assert rescore.test_version_of({}) is None  # before lineage
    assert rescore.test_version_of({"test_version": T1, "lineage": tested}) == T1


# ---------------------------------------------------------------- the comparison


def test_old_numbers_would_promote_the_fair_ones_do_not(tmp_path: Path) -> None:
    """The champion scored 60% on the old test set; the challenger 62% on a new one, where the
    champion scores 70%: not promoted."""
    ws = champion(tmp_path, 60.0)
    challenger(ws, 62.0)
    before = snapshot(ws)
    with pytest.raises(rescore.NeedsRescore) as need:
        promotion.promote(ws, env={})
    assert (need.value.test_version, need.value.commit) == (T1, COMMIT)
    assert need.value.model == best_of(ws)["model"]
    assert snapshot(ws) == before, "nothing is decided, nor written, without a fair number"

    run_id = evaluation(ws, 70.0)
    result = promotion.promote(ws, env={})

    assert not result.promoted, result.message
    assert f"kept the current best 70% (run champ, re-scored on this run's test set by " \
           f"{run_id}; 60% on its own test set); this run's 62% is not better" == result.message
    assert read_props(ws / "promotion.properties")["BEST_ACCURACY"] == "70"
    best = best_of(ws)
    assert (best["run_id"], best["accuracy"], best["test_version"]) == ("champ", 60.0, T0)
    assert {version: score["accuracy"] for version, score in best["scores"].items()} == {
        T0: 60.0, T1: 70.0}
    assert best["scores"][T1]["measured_by"] == run_id
    assert best["scores"][T0]["measured_by"] == "champ"
    assert (ws / "best-model.pt").read_bytes() == b"champion"


def test_the_reverse_old_numbers_would_keep_the_fair_ones_promote(tmp_path: Path) -> None:
    """The champion scored 70% on the old test set; the challenger 62% on a new one, where the
    champion scores 55%: promoted, and best.json starts the new model's scores on T1."""
    ws = champion(tmp_path, 70.0)
    challenger(ws, 62.0)
    run_id = evaluation(ws, 55.0)

    result = promotion.promote(ws, env={})

    assert result.promoted, result.message
    assert f"previous 55%, re-scored on this run's test set by {run_id}; 70% on its own test " \
           "set" in result.message
    best = best_of(ws)
    assert (best["run_id"], best["accuracy"], best["test_version"]) == ("chall", 62.0, T1)
    assert list(best["scores"]) == [T1] and best["scores"][T1]["accuracy"] == 62.0
    assert best["replaced"]["accuracy"] == 55.0, "the mail compares with the fair number"
    assert (ws / "best-model.pt").read_bytes() == b"challenger"


def test_on_the_same_test_set_the_own_numbers_compare_and_nothing_is_re_scored(tmp_path):
    ws = champion(tmp_path, 60.0)
    challenger(ws, 59.0, test_version=T0)
    assert promotion.promote(ws, env={}).message.startswith("kept the current best 60% (run champ)")
    challenger(ws, 61.0, test_version=T0)
    assert promotion.promote(ws, env={}).promoted
    assert not list((ws / "runs").glob("eval-*"))


def test_only_an_evaluation_of_this_model_on_this_test_set_counts(tmp_path: Path) -> None:
    ws = champion(tmp_path, 60.0)
    challenger(ws, 62.0)
    evaluation(ws, 10.0, model=b"another model", name="eval-20250103-000000-aaaaaaaaaa")
    evaluation(ws, 10.0, test_version=T0, name="eval-20250104-000000-bbbbbbbbbb")
    with pytest.raises(rescore.NeedsRescore):
        promotion.promote(ws, env={})
    evaluation(ws, 61.0, name="eval-20250101-000000-cccccccccc")
    evaluation(ws, 63.0, name="eval-20250105-000000-dddddddddd")  # the newest counts
    assert not promotion.promote(ws, env={}).promoted
    assert best_of(ws)["scores"][T1]["accuracy"] == 63.0


def test_the_per_class_guard_uses_the_re_scored_classes(tmp_path: Path) -> None:
    """cat: 90% on the old test set, 60% on the new one; the challenger's 58% lost 2 points on
    the same test set (the guard allows 5), not 32."""
    ws = champion(tmp_path, 60.0, cat=90.0)
    challenger(ws, 65.0, cat=58.0)
    evaluation(ws, 61.0, cat=60.0)
    result = promotion.promote(ws, env={"CT_MAX_CLASS_DROP": "5"})
    assert result.promoted and "no class lost more than 5 points" in result.message
    assert best_of(ws)["replaced"]["per_class_accuracy"]["cat"] == 60.0


def test_a_run_whose_test_set_is_unknown_is_not_compared(tmp_path: Path) -> None:
    ws = champion(tmp_path, 60.0)
    write_run(ws, 99.0, run_id="old", model_bytes=b"old code's model")
    set_metrics(ws, lineage={"dataset_sha256": "d" * 64, "data_version": "v",
                             "data": {"increment_test": 4}})
    result = promotion.promote(ws, env={})
    assert not result.promoted and "records no test version" in result.message
    assert best_of(ws)["run_id"] == "champ"


def test_a_best_from_before_test_versions_on_the_base_test_set_is_compared_as_it_is(tmp_path):
    ws = make_workspace(tmp_path / "ws", 60.0, run_id="champ", model_bytes=b"champion")
    base = "d" * 64
    set_metrics(ws, lineage={"dataset_sha256": base, "commit": COMMIT, "data_version": "v",
                             "data": {"increment_test": 0}})
    assert promotion.promote(ws, env={}).promoted
    old = {key: value for key, value in best_of(ws).items() if key not in ("test_version",
                                                                           "scores")}
    (ws / "best.json").write_text(json.dumps(old))  # as promoted before test versions
    challenger(ws, 59.0, test_version=data_version.version_of(base, []))
    assert promotion.promote(ws, env={}).message.startswith("kept the current best 60%")
    challenger(ws, 59.0)  # T1: another test set
    with pytest.raises(rescore.NeedsRescore):
        promotion.promote(ws, env={})


# ---------------------------------------------------------------- after_run and job4


def judge(ws: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_module("ct.pipeline.after_run", "--workspace", str(ws), "judge", "--threshold",
                      "50", *extra)


def test_judge_says_rescore_then_compares_once(tmp_path: Path) -> None:
    ws = champion(tmp_path, 60.0)
    challenger(ws, 62.0)
    asked = judge(ws)
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.split() == ["rescore", COMMIT, best_of(ws)["model"]]
    assert not (ws / "status" / "after-run.properties").exists(), "not judged yet"

    refused = judge(ws, "--rescored")  # re-scored, yet no evaluation: never asked twice
    assert refused.returncode == 2 and refused.stdout == ""
    assert [line for line in refused.stderr.splitlines() if "ct.after_run:" in line] == [
        refused.stderr.splitlines()[-1]]
    assert "was re-scored, but no evaluation" in refused.stderr
    assert "nothing promoted, the best model stays" in refused.stderr

    evaluation(ws, 70.0)
    done = judge(ws, "--rescored")
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr
    assert "kept the current best 70%" in done.stderr
    assert sorted(best_of(ws)["scores"]) == sorted([T0, T1])


def test_the_cli_says_which_evaluation_to_run(tmp_path: Path) -> None:
    ws = champion(tmp_path, 60.0)
    challenger(ws, 62.0)
    result = run_module("ct.pipeline.promote", "--workspace", str(ws))
    assert result.returncode == 3 and len(result.stderr.splitlines()) == 1
    assert "python -m ct.trainer.evaluate" in result.stderr and COMMIT in result.stderr


def test_a_best_model_whose_code_is_gone_stays(tmp_path: Path, script_env: dict[str, str]):
    """job4 with a best model whose commit is in no snapshot and no repository: one line, exit
    2, nothing promoted."""
    ws = champion(tmp_path, 60.0)
    challenger(ws, 99.0)
    before = snapshot(ws)
    failed = run_script("job4-gate.sh", {**script_env, "CT_WORKSPACE": str(ws)}, check=False)
    assert failed.returncode == 2
    errors = [line for line in failed.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"commit {COMMIT}) is gone" in errors[0]
    assert "the best model stays" in errors[0]
    after = snapshot(ws)
    assert after["best.json"] == before["best.json"] and after["best-model.pt"] == b"champion"
    assert "promotion.properties" not in after or \
        after["promotion.properties"] == before["promotion.properties"]


# ---------------------------------------------------------------- ct.trainer.evaluate


def evaluate(ws: Path, model: Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ct.trainer.evaluate", str(model), "--out",
                           str(ws)], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": str(cwd), "PYTHONDONTWRITEBYTECODE": "1"})


@pytest.mark.parametrize("content", [None, b"", b"not a model at all\n", b"PK\x03\x04broken"])
def test_a_missing_or_corrupt_model_is_one_line_and_writes_nothing(tmp_path, content):
    ws = tmp_path / "ws"
    (ws / "runs").mkdir(parents=True)
    model = ws / "model.pt"
    if content is not None:
        model.write_bytes(content)
    result = evaluate(ws, model)
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("ct.trainer.evaluate: error: ") and str(model) in result.stderr
    assert list((ws / "runs").iterdir()) == []


# ---------------------------------------------------------------- the chain, for real


def add_increment(ws: Path, tests: int = 11, trains: int = 3) -> None:
    """New images (noise, none like another): `tests` test and `trains` training images."""
    root = ws / "data" / "increments" / "2025-01"
    for i in range(tests):
        image(root / "test" / CLASSES[i % 10] / f"t{i}.png", 1000 + i)
    for i in range(trains):
        image(root / "train" / CLASSES[i % 10] / f"n{i}.png", 2000 + i)


# the whole chain twice (about 35 s on 2 cores): the slow suite; the decision itself is tested
# above, fast
@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["local", pytest.param("docker", marks=pytest.mark.docker)])
def test_the_chain_re_scores_the_champion_on_a_new_test_set(source_repo, script_env, request,
                                                            runtime):
    """job1..job4 make a champion; an increment with test images and a retrain (job2, job3);
    job4 with the champion's stored model corrupt: one line, exit 2, champion untouched; job4
    again: the champion is re-scored on the new test set (an eval-* run, best.json's scores on
    two test sets) and the decision uses that number. On docker, in the champion's image."""
    given = script_env if runtime == "local" else request.getfixturevalue("docker_env")
    env = {**given, "CT_TRAIN_ARGS": "--batch-size 64 --epochs 1 --seed 1", "CT_THRESHOLD": "5"}
    ws = Path(env["CT_WORKSPACE"])
    for script in ("job1-pull.sh", "job2-image.sh", "job3-train.sh", "job4-gate.sh"):
        run_script(script, env, *([str(source_repo)] if script == "job1-pull.sh" else []))
    first = json.loads((ws / "metrics.json").read_text())
    best = best_of(ws)
    t0 = first["test_version"]
    assert best["run_id"] == first["run_id"] and best["test_version"] == t0
    assert best["lineage"]["test_version"] == t0 and list(best["scores"]) == [t0]

    own = evaluate(ws, ws / "best-model.pt")  # the run's own test set: the run's own numbers
    assert own.returncode == 0, own.stderr
    (folder,) = (ws / "runs").glob("eval-*")
    again = json.loads((folder / "metrics.json").read_text())
    assert (again["accuracy"], again["per_class_accuracy"], again["test_version"]) == (
        first["accuracy"], first["per_class_accuracy"], t0)
    assert again["model_sha256"] == best["model_sha256"]
    shutil.rmtree(folder)

    add_increment(ws)
    # a challenger that learns next to nothing: the champion must stay, on the fair number
    env["CT_TRAIN_ARGS"] += " --subset 100 --lr 0.000001 --muon-lr 0.000001"
    run_script("job2-image.sh", env)
    run_script("job3-train.sh", env)
    second = json.loads((ws / "metrics.json").read_text())
    t1 = second["test_version"]
    assert t1 != t0 and second["data"]["increment_test"] == 11

    stored = ws / best["model"]
    good = stored.read_bytes()
    stored.write_bytes(b"\0" * 64)
    kept = {name: (ws / name).read_bytes() for name in ("best.json", "metrics.json")}
    broken = run_script("job4-gate.sh", env, check=False)
    assert broken.returncode == 2
    said = [line for line in broken.stderr.splitlines() if "ct.trainer.evaluate: error" in line]
    assert len(said) == 1 and best["model"] in said[0], broken.stderr
    assert {name: (ws / name).read_bytes() for name in kept} == kept
    assert not list((ws / "runs").glob("eval-*"))

    stored.write_bytes(good)
    judged = run_script("job4-gate.sh", env)
    (folder,) = (ws / "runs").glob("eval-*")
    rescored = json.loads((folder / "metrics.json").read_text())
    assert (rescored["test_version"], rescored["model_sha256"]) == (t1, best["model_sha256"])
    assert rescored["accuracy"] != first["accuracy"], "11 more test images change the score"
    assert f"re-scored on this run's test set by {rescored['run_id']}" in judged.stderr
    after = best_of(ws)
    promoted = read_props(ws / "promotion.properties")["PROMOTED"] == "true"
    assert promoted == (second["accuracy"] > rescored["accuracy"])
    assert not promoted, f"the challenger ({second['accuracy']}%) won"
    assert after["run_id"] == first["run_id"]
    assert {v: s["accuracy"] for v, s in after["scores"].items()} == {
        t0: first["accuracy"], t1: rescored["accuracy"]}
    assert read_props(ws / "promotion.properties")["BEST_ACCURACY"] == \
        f"{rescored['accuracy']:g}"
    assert json.loads((ws / "metrics.json").read_text())["run_id"] == second["run_id"]
    assert (ws / "accuracy.txt").read_text() == f"{second['accuracy']:.2f}\n"
