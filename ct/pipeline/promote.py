"""Model promotion (job4, job5): keep the run's model when it beats the best one. Standard library.

    python3 -m ct.pipeline.promote --workspace W

The run and the best model are compared on the run's own test set, never across test sets
(ct.pipeline.rescore): the best's score there comes from best.json's `scores`, or from an
evaluation of it in runs/eval-* (recorded into `scores` first); with neither, nothing is decided
(NeedsRescore; this command line: exit 3 with the evaluation to run). Only when the run beats the
best there (and, with CT_MAX_CLASS_DROP set, no class's test accuracy fell by more than that many
points against the best's on that test set, ct.pipeline.class_guard): stores the run's model as
W/models/best-<sha256[:16]>.pt, renames a new W/best.json over the old one (the record, which
names that file and its sha256 and carries the run's `lineage`, test_version, its own score in
`scores` and per-class accuracy, the pipeline's own measurement of it (`measured`: its accuracy,
which is the record's, and the run's claim; ct.pipeline.measured), and the numbers of the model
it replaces: the commit point),
then points the symlink W/best-model.pt at it and deletes the stored models no record names. A
reader of best.json and of the model it names sees the old pair or the new pair.
W/promotion.properties says whether it promoted (BEST_ACCURACY: the best's score on the run's
test set). Errors, I/O errors included, are one line on stderr and exit 2, with nothing written
(or, past the commit point, a line saying what to repair).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ct import atomic, untrusted
from ct.pipeline import cli, records
from ct.pipeline.class_guard import class_guard, max_class_drop, per_class
from ct.pipeline.errors import PipelineError
from ct.pipeline.records import (
    RERUN_TRAINING,
    fix_workspace,
    fmt_number,
    format_properties,
    is_percentage,
    load_json_object,
    load_metrics,
    os_reason,
    run_params,
    utc_now,
    write_files,
)
from ct.pipeline.rescore import (
    SCORES,
    TEST_VERSION,
    NeedsRescore,
    Yardstick,
    own_score,
    test_version_of,
    yardstick,
)
from ct.workspace import (
    BEST_FILE,
    BEST_MODEL,
    LINEAGE,
    METRICS_FILE,
    MODELS_DIR,
    PROMOTION_PROPERTIES,
    RUNS_DIR,
    commit_of_run,
)

STORED_NAME = ("best-", ".pt")  # models/best-<sha256[:16]>.pt
MEASURED = "measured"  # best.json: the pipeline's measurement of the model, the claim beside it
_STORED_MODEL = re.compile(r"best-[0-9a-f]{16}\.pt")
_LEFTOVER = re.compile(r"\.best-(incoming|[0-9a-f]{16})\.pt\..*\.tmp")  # a write killed midway
MAX_MODEL_BYTES = 1 << 30  # a CIFAR-10 CNN's state is megabytes; this only stops the absurd


def promote_remedy(workspace: Path) -> str:
    return fix_workspace(workspace, "the best model is unchanged", "rerun ct.pipeline.promote")


def run_model(workspace: Path, metrics: Mapping[str, Any]) -> tuple[str, bytes]:
    """The model metrics.json names (relative to W) and its bytes. It must lie in the run's own
    folder (runs/<run id>/), reached without a symbolic link, and be a non-empty regular file of
    at most MAX_MODEL_BYTES: metrics.json is the container's word, and "model": "/etc/shadow"
    must not become best-model.pt."""
    name, run_dir = metrics["model"], metrics["run_dir"]
    where = workspace / METRICS_FILE
    if not (untrusted.within(run_dir, RUNS_DIR) and len(untrusted.inside(run_dir)) == 2
            and untrusted.within(name, run_dir)):
        raise PipelineError(
            f"{where} names model {str(name)[:80]!r}, not a file in its run folder "
            f"{str(run_dir)[:80]!r} (runs/<run id>/); nothing promoted; {RERUN_TRAINING}")
    path = workspace / name
    try:
        data = untrusted.read_bytes(path, MAX_MODEL_BYTES, root=workspace)
    except untrusted.Missing:
        raise PipelineError(
            f"{path} (named by {where}) is missing; nothing promoted; {RERUN_TRAINING}") from None
    except untrusted.UntrustedFile as err:
        raise PipelineError(f"{err}; nothing promoted; {RERUN_TRAINING}") from None
    if not data:
        raise PipelineError(f"{path} is empty; nothing promoted; {RERUN_TRAINING}")
    return name, data


def load_best(workspace: Path) -> dict[str, Any] | None:
    """The current best record, None when there is none; a damaged one is a PipelineError."""
    path = workspace / BEST_FILE
    if not path.exists():
        return None
    remedy = f"nothing changed; inspect it (and {workspace / BEST_MODEL}), then repair or remove it"
    best = load_json_object(path, remedy)
    if not is_percentage(best.get("accuracy")):
        raise PipelineError(
            f"{path} has accuracy {best.get('accuracy')!r}, not a percentage; {remedy}")
    # Records from before models/ name best-model.pt itself, or nothing: that is the model then.
    best.setdefault("model", BEST_MODEL)
    if not records.is_workspace_file(best["model"]):
        raise PipelineError(f"{path} names model {best['model']!r}, not a workspace file; {remedy}")
    return best


def best_model_missing(workspace: Path, best: Mapping[str, Any]) -> bool:
    """The recorded model, or the best-model.pt users open, is gone: any run may replace it."""
    return not (workspace / best["model"]).is_file() or not (workspace / BEST_MODEL).is_file()


def stored_name(best: Mapping[str, Any] | None) -> str | None:
    """The file in models/ that a record names; None for no record, or one from before models/."""
    if best is None or PurePosixPath(best["model"]).parent != PurePosixPath(MODELS_DIR):
        return None
    return PurePosixPath(best["model"]).name


TUNING_FACTS = ("study", "trials", "trials_finished", "trials_pruned")
PER_CLASS = ("classes", "per_class_accuracy")  # what best.json keeps of a run's per-class view


def best_record(
    workspace: Path, metrics: Mapping[str, Any], model: str, sha256: str,
    replaced: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    record_ = {
        "accuracy": metrics["accuracy"],
        "params": run_params(metrics),
        "commit": commit_of_run(workspace, metrics) or None,
        "run_id": metrics["run_id"],
        "run_dir": metrics["run_dir"],
        "mode": metrics.get("mode"),
        "source_model": metrics["model"],
        "model": model,
        "model_sha256": sha256,
        "promoted_at": utc_now(),
    }
    if metrics.get("val_accuracy") is not None:
        record_["val_accuracy"] = metrics["val_accuracy"]
    if isinstance(metrics.get(MEASURED), Mapping):  # the pipeline's own figure, and the claim
        record_[MEASURED] = metrics[MEASURED]
    # A tuning round's study and how its trials ended (train.py --tune's summary)
    for key in TUNING_FACTS:
        if metrics.get(key) is not None:
            record_[key] = metrics[key]
    # Where the model came from (commit, image, data, seed, ...), as the trainer recorded it;
    # runs from before lineage have none, and their record has none either.
    if isinstance(metrics.get(LINEAGE), dict):
        record_[LINEAGE] = metrics[LINEAGE]
    if per_class(metrics) is not None:  # the guard's yardstick for the next challenger
        record_.update({key: metrics[key] for key in PER_CLASS if key in metrics})
    # The test set this model's accuracy was measured on, and its score there: the first of
    # its scores per test set (ct.pipeline.rescore), which re-scorings add to.
    tested = test_version_of(metrics)
    if tested is not None:
        record_[TEST_VERSION] = tested
        record_[SCORES] = {tested: own_score(metrics, metrics.get("finished_at"))}
    if replaced is not None:
        # The mail, written after this record, compares the run with the model it replaced
        # (its numbers on this run's test set).
        record_["replaced"] = {key: replaced[key] for key in ("run_id", "accuracy", *PER_CLASS)
                               if key in replaced}
    return record_


def promotion_text(promoted: bool, accuracy: str, best_accuracy: str) -> str:
    properties = {
        "PROMOTED": "true" if promoted else "false",
        "ACCURACY": accuracy,
        "BEST_ACCURACY": best_accuracy,
    }
    return format_properties(properties, "written by ct.promote")


@contextmanager
def promotion_lock(workspace: Path) -> Iterator[None]:
    """Promotions of one workspace take turns (job4 and job5 may end together): comparing with
    the best, replacing it and pruning models/ must not interleave. The lock is on the workspace
    folder itself, so taking it writes nothing."""
    try:
        fd = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        raise PipelineError(
            f"cannot open {workspace} ({os_reason(err)}); nothing promoted; check --workspace"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without locks: promote unlocked, as before there was a lock
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    message: str


def promote(workspace: Path, env: Mapping[str, str] = os.environ, rescore: bool = True,
            measured: Mapping[str, Any] | None = None) -> Promotion:
    """Promote the latest run when it beats the best model on the run's own test set. Raises
    NeedsRescore (with `rescore`) when the best has no score there yet: nothing is written.
    `measured` (ct.pipeline.measured): the pipeline's own measurement of the run, whose
    accuracy is then the run's, instead of the one it claimed."""
    limit = max_class_drop(env)  # first: a nonsense setting promotes nothing
    with promotion_lock(workspace):
        metrics = load_metrics(workspace)
        if measured is not None:
            metrics = {**metrics, "accuracy": measured["accuracy"], MEASURED: dict(measured)}
        source = run_model(workspace, metrics)
        best = load_best(workspace)
        accuracy = fmt_number(metrics["accuracy"])
        missing = best is not None and best_model_missing(workspace, best)
        yard = None
        if best is not None and not missing:
            yard = yardstick(workspace, best, metrics, rescore, promote_remedy(workspace))
            if yard is None or metrics["accuracy"] <= yard.accuracy:
                return Promotion(False, keep(workspace, best, accuracy, yard))
        refused, guard = (False, "") if yard is None or limit is None else \
            class_guard(metrics, yard.record, limit)
        if refused and best is not None:
            return Promotion(False, keep(workspace, best, accuracy, yard, guard))
        model = install(workspace, metrics, source, best if yard is None else yard.record)
    before = "no previous best" if best is None else \
        f"previous {fmt_number(best['accuracy'] if yard is None else yard.accuracy)}%"
    if missing:
        before += f", whose {BEST_MODEL} was missing"
    elif yard is not None:
        before += yard.how
    return Promotion(True, f"promoted {metrics['model']} ({accuracy}%, {before}) to "
                           f"{workspace / BEST_MODEL} -> {model}" + (f"; {guard}" if guard else ""))


def keep(workspace: Path, best: Mapping[str, Any], accuracy: str, yard: Yardstick | None,
         refused: str = "") -> str:
    """Keep the best model (settling its link): the line that says why. `yard` None: the run's
    test set is unknown, so it cannot be compared with the best on the same test set."""
    best_accuracy = fmt_number(best["accuracy"] if yard is None else yard.accuracy)
    text = promotion_text(False, accuracy, best_accuracy)
    write_files({workspace / PROMOTION_PROPERTIES: text}, promote_remedy(workspace))
    settle(workspace, best)  # repairs what an earlier promotion could not finish
    if yard is None:
        why = (f"this run records no test version (older code, and increment test images or no "
               f"lineage), so its {accuracy}% cannot be compared with the best's on one test set")
    elif refused:
        why = f"this run's {accuracy}% is better, but {refused}"
    else:
        why = f"this run's {accuracy}% is not better"
    how = "" if yard is None else yard.how
    return f"kept the current best {best_accuracy}% (run {best.get('run_id')}{how}); {why}"


def install(workspace: Path, metrics: Mapping[str, Any], source: tuple[str, bytes],
            replaced: Mapping[str, Any] | None = None) -> str:
    """Make the run's model the best; returns the stored model's name (relative to W).

    The stored copy is invisible until the rename of best.json names it: the last step of one
    change with promotion.properties. best-model.pt follows, then the old model goes."""
    remedy = promote_remedy(workspace)
    link = workspace / BEST_MODEL
    if link.is_dir() and not link.is_symlink():
        raise PipelineError(f"{link} is a folder; nothing promoted; move it away, then rerun")
    model, sha256 = store_model(workspace, source, remedy)
    accuracy = fmt_number(metrics["accuracy"])
    new = best_record(workspace, metrics, model, sha256, replaced)
    files = {  # best.json last: its rename is the commit point
        workspace / PROMOTION_PROPERTIES: promotion_text(True, accuracy, accuracy),
        workspace / BEST_FILE: json.dumps(new, indent=2, sort_keys=True) + "\n",
    }
    try:
        write_files(files, remedy)
    except PipelineError:
        prune_unnamed(workspace)  # the new copy, unless the old record names the same content
        raise
    settle(workspace, new)
    return model


def store_model(workspace: Path, source: tuple[str, bytes], remedy: str) -> tuple[str, str]:
    """Write the model's bytes to models/ under their content's name; (name relative to W,
    sha256). models/ must be a real folder of W: through a symbolic link there, the write (and
    the pruning after it) would land outside the workspace."""
    name, data = source
    try:
        folder = untrusted.real_folder(workspace, MODELS_DIR, create=True)
    except untrusted.UntrustedFile as err:
        raise PipelineError(f"cannot store {name} in {MODELS_DIR}/ ({err}); {remedy}") from None
    sha256 = hashlib.sha256(data).hexdigest()
    stored = folder / f"{STORED_NAME[0]}{sha256[:16]}{STORED_NAME[1]}"
    try:
        atomic.write_bytes(stored, data)
    except OSError as err:
        raise PipelineError(f"cannot store {name} in {folder} ({os_reason(err)}); {remedy}"
                            ) from None
    return stored.relative_to(workspace).as_posix(), sha256


def settle(workspace: Path, best: Mapping[str, Any]) -> None:
    """Point best-model.pt at the model the record names, then drop the models no record names.
    Only ever called with the record in place, so nothing it names is deleted."""
    name = stored_name(best)
    if name is None:
        return  # a record from before models/: best-model.pt is the model file itself
    link, model = workspace / BEST_MODEL, best["model"]
    if not (link.is_symlink() and os.readlink(link) == model):
        try:
            atomic.replace_symlink(link, model)
        except atomic.WriteError as err:
            raise PipelineError(
                f"{workspace / BEST_FILE} names {model}, but {link} cannot point at it "
                f"({err.reason}); move {link} away, then rerun ct.pipeline.promote "
                "to repair the link"
            ) from None
    prune_models(workspace, keep=name)


def prune_unnamed(workspace: Path) -> None:
    """Delete the stored models that the record now on disk does not name; it is read again
    rather than assumed, so that a model is never deleted while a record names it."""
    try:
        best = load_best(workspace)
    except PipelineError:
        return  # cannot tell what is named: delete nothing
    prune_models(workspace, keep=stored_name(best))


def prune_models(workspace: Path, keep: str | None) -> None:
    """Delete the stored models other than `keep`, and copies killed midway. Best effort: a file
    left over costs disk space, not consistency, and the next promotion tries again. Deleted
    through a descriptor of models/ opened without following links: never a file elsewhere."""
    try:
        with untrusted.folder(workspace, (MODELS_DIR,)) as fd:
            for name in os.listdir(fd):
                ours = _STORED_MODEL.fullmatch(name) or _LEFTOVER.fullmatch(name)
                if ours and name != keep:
                    try:
                        os.unlink(name, dir_fd=fd)
                    except OSError:
                        pass
    except (untrusted.UntrustedFile, OSError):
        return


# ---------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.parser("ct.promote", __doc__)
    args = parser.parse_args(argv)
    workspace = cli.workspace_or_exit(parser, args.workspace)

    def action() -> int:
        try:
            print(f"ct.promote: {promote(workspace).message}")
        except NeedsRescore as need:  # job4 re-scores it (lib.sh after_run); by hand: say how
            print(f"ct.promote: nothing decided: {need}: python -m ct.trainer.evaluate "
                  f"{workspace / need.model} --out {workspace} (the code of commit "
                  f"{need.commit}), then rerun ct.pipeline.promote", file=sys.stderr)
            return 3
        return 0

    return cli.run("ct.promote", action)


if __name__ == "__main__":
    raise SystemExit(main())
