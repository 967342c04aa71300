"""The best model's scores per test set, so that promotion compares a run with the best model on
the run's own test set, never across test sets. Standard library only.

A run's accuracy is measured on its test set, named by its `test_version`
(ct.data_version.test_version: the CIFAR-10 base and the increments' test images). An increment
with test images changes the test set, and the best model's accuracy, measured on the old one,
no longer compares with a new run's. So best.json keeps the best model's scores by test set:

    "test_version": the test set of the run that made the best model
    "scores": {TEST_VERSION: {"accuracy", "per_class_accuracy", "measured_by": RUN_ID, "at": TIME}}

Its own score is written on promotion; a re-scoring adds another: `python -m ct.trainer.evaluate`
(the best model, the code of its commit, the test set the data holds now) leaves
runs/eval-*/metrics.json, which promotion finds and records here. When the best model has no
score on a run's test set and no evaluation gives one, promotion stops with NeedsRescore (not an
error): ct.pipeline.after_run prints `rescore COMMIT MODEL`, the job script evaluates the model,
and the run is judged again, once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ct import data_version, untrusted
from ct import workspace as names
from ct.pipeline import records
from ct.pipeline.errors import PipelineError
from ct.pipeline.records import fmt_number, is_percentage, utc_now

SCORES = "scores"
TEST_VERSION = "test_version"
EVAL_KIND = names.EVAL_RUNS  # runs/eval-<UTC time>-<model sha256[:10]>/ (ct.trainer.evaluate)
_DIGEST = re.compile(r"[0-9a-f]{64}")
MAX_EVALUATION = 4 << 20  # an evaluation's metrics.json
_FULL_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # what the job scripts can snapshot


class NeedsRescore(Exception):  # a condition to act on (re-score), not an error
    """The best model has no score on the run's test set: evaluate it there, then judge again.
    `model` is the workspace file to evaluate, `commit` the commit whose code trained it."""

    def __init__(self, test_version: str, model: str, commit: str, run_id: Any) -> None:
        super().__init__(
            f"the best model (run {run_id}) has no score on this run's test set "
            f"{test_version[:12]}: re-scoring {model} with the code of commit {commit[:12]} "
            "before comparing")
        self.test_version, self.model, self.commit = test_version, model, commit


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def test_version_of(record: Mapping[str, Any]) -> str | None:
    """The test set a run summary (or best.json) was measured on: its `test_version`, or its
    lineage's. A record from before test versions names it through its lineage when it read no
    increment test image: the base's test set, version_of(dataset_sha256, []). None: unknown."""
    lineage = record.get(names.LINEAGE)
    lineage = lineage if isinstance(lineage, Mapping) else {}
    for source in (record, lineage):
        if _is_digest(source.get(TEST_VERSION)):
            return str(source[TEST_VERSION])
    if not _is_digest(lineage.get("dataset_sha256")):
        return None  # no lineage (records from before it): no identity to go by
    data = lineage.get("data")
    if "data_version" in lineage or data is not None:  # recorded since increments exist
        if not isinstance(data, Mapping) or data.get("increment_test") != 0:
            return None
    return data_version.version_of(str(lineage["dataset_sha256"]), [])


def base_test_set(record: Mapping[str, Any]) -> bool:
    """Whether a run summary was measured on the base's test set alone: its data counts say no
    increment test image, or it predates increments (a lineage without them, or none at all:
    before lineage there were no increments either)."""
    lineage = record.get(names.LINEAGE)
    if not isinstance(lineage, Mapping):
        return True
    data = record.get("data") if isinstance(record.get("data"), Mapping) else lineage.get("data")
    if isinstance(data, Mapping):
        return data.get("increment_test") == 0
    return "data_version" not in lineage


def own_score(record: Mapping[str, Any], at: Any = None) -> dict[str, Any]:
    """A run's (or the best model's) score on its own test set, as `scores` keeps it."""
    return {"accuracy": record["accuracy"], "per_class_accuracy": record.get("per_class_accuracy"),
            "measured_by": record.get("run_id"), "at": at if isinstance(at, str) else utc_now()}


def scores_of(best: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """best.json's scores by test version; entries that are not a score are left out."""
    scores = best.get(SCORES)
    if not isinstance(scores, Mapping):
        return {}
    return {version: dict(score) for version, score in scores.items()
            if _is_digest(version) and isinstance(score, Mapping)
            and is_percentage(score.get("accuracy"))}


def score_on(best: Mapping[str, Any], test_version: str) -> dict[str, Any] | None:
    """The best model's score on that test set: recorded in `scores`, or its own when it was
    measured there; None when it has none."""
    score = scores_of(best).get(test_version)
    if score is None and test_version_of(best) == test_version:
        score = own_score(best, best.get("promoted_at"))
    return score


def with_score(best: Mapping[str, Any], test_version: str, score: Mapping[str, Any]
               ) -> dict[str, Any]:
    """best.json with one more score; the model's own is kept beside it (a record written before
    `scores` existed gets it here)."""
    scores = scores_of(best)
    own = test_version_of(best)
    if own is not None and own not in scores:
        scores[own] = own_score(best, best.get("promoted_at"))
    scores[test_version] = dict(score)
    return {**best, SCORES: scores}


def find_evaluation(workspace: Path, best: Mapping[str, Any], test_version: str
                    ) -> dict[str, Any] | None:
    """The newest evaluation of the best model (by its bytes' sha256) on that test set among
    runs/eval-*/metrics.json; None when there is none."""
    sha256 = best.get("model_sha256")
    if not _is_digest(sha256):
        try:  # a record from before model_sha256: the file it names, never through a link
            sha256 = untrusted.sha256(workspace / best["model"], workspace)
        except untrusted.UntrustedFile:
            return None
    folders = sorted((workspace / names.RUNS_DIR).glob(f"{EVAL_KIND}-*"),
                     key=lambda path: path.name, reverse=True)
    for folder in folders:
        found = evaluation_of(workspace, folder)
        if (found is not None and found.get("mode") == EVAL_KIND
                and found.get("model_sha256") == sha256
                and found.get(TEST_VERSION) == test_version
                and is_percentage(found.get("accuracy"))):
            return found
    return None


def evaluation_of(workspace: Path, folder: Path) -> dict[str, Any] | None:
    """runs/eval-*/metrics.json when it is a JSON object in a regular file reached without a
    link (None otherwise: an evaluation that cannot be trusted to be one is no evaluation)."""
    try:
        found = untrusted.read_json(folder / names.RUN_METRICS, MAX_EVALUATION, root=workspace)
    except untrusted.UntrustedFile:
        return None
    return found if isinstance(found, dict) else None


def champion_commit(best: Mapping[str, Any]) -> str | None:
    """The commit whose code trained the best model (its lineage's, else the record's), when it
    is a full commit id the job scripts can take a snapshot of."""
    lineage = best.get(names.LINEAGE)
    for commit in ((lineage or {}).get("commit") if isinstance(lineage, Mapping) else None,
                   best.get("commit")):
        if isinstance(commit, str) and _FULL_COMMIT.fullmatch(commit):
            return commit
    return None


@dataclass(frozen=True)
class Yardstick:
    """The best model's numbers a run is compared with, all measured on the run's test set."""

    accuracy: float
    record: dict[str, Any]  # run_id, accuracy, classes, per_class_accuracy: the per-class guard's
    #                         and the mail's (best.json `replaced`) view of the best model
    how: str  # for the promotion line: "" for its own score, else where the number comes from


def yardstick(workspace: Path, best: Mapping[str, Any], metrics: Mapping[str, Any],
              rescore: bool, remedy: str) -> Yardstick | None:
    """The best model's score on the test set of the run `metrics` describes. An evaluation of
    it found in runs/ is recorded in best.json first (one atomic rewrite). None: the run's test
    set is unknown while the best's is known, so the two cannot be compared. NeedsRescore when
    the best has no score there (with `rescore`; without, a PipelineError: it was re-scored
    already and still has none)."""
    tested = test_version_of(metrics)
    if (names.LINEAGE not in best and test_version_of(best) is None and not scores_of(best)
            and base_test_set(metrics)):
        # a best from before lineage was measured on CIFAR-10's test set, the only one there
        # was; so is this run, whose test set holds no increment image
        return _yardstick(best, own_score(best), "")
    if tested is None:
        return None
    score = score_on(best, tested)
    if score is None:
        evaluation = find_evaluation(workspace, best, tested)
        if evaluation is None:
            raise _cannot_compare(best, tested, rescore)
        score = {"accuracy": evaluation["accuracy"],
                 "per_class_accuracy": evaluation.get("per_class_accuracy"),
                 "measured_by": evaluation.get("run_id"),
                 "at": evaluation.get("finished_at") or utc_now()}
        updated = json.dumps(with_score(best, tested, score), indent=2, sort_keys=True) + "\n"
        records.write_files({workspace / names.BEST_FILE: updated}, remedy)
    how = ""
    if score["measured_by"] != best.get("run_id"):
        how = (f", re-scored on this run's test set by {score['measured_by']}; "
               f"{fmt_number(best['accuracy'])}% on its own test set")
    return _yardstick(best, score, how)


def _yardstick(best: Mapping[str, Any], score: Mapping[str, Any], how: str) -> Yardstick:
    record = {"run_id": best.get("run_id"), "accuracy": score["accuracy"],
              "classes": best.get("classes"),
              "per_class_accuracy": score.get("per_class_accuracy")}
    return Yardstick(float(score["accuracy"]), record, how)


def _cannot_compare(best: Mapping[str, Any], tested: str, rescore: bool) -> Exception:
    stays = "nothing promoted, the best model stays"
    commit = champion_commit(best)
    if not rescore:
        return PipelineError(
            f"the best model (run {best.get('run_id')}) was re-scored, but no evaluation of it "
            f"on this run's test set {tested[:12]} is in {names.RUNS_DIR}/{EVAL_KIND}-*; "
            f"{stays}; see the evaluation's lines above, then run job4 again")
    if commit is None:
        return PipelineError(
            f"the best model (run {best.get('run_id')}) has no score on this run's test set "
            f"{tested[:12]} and names no commit whose code could re-score it; {stays}; "
            f"evaluate it by hand (python -m ct.trainer.evaluate W/{best['model']} --out W, with "
            "the code that trained it), then run job4 again; or move best.json away to let "
            "this run start a new best")
    return NeedsRescore(tested, str(best["model"]), commit, best.get("run_id"))
