"""A run's lineage: what it was made from, recorded in its metrics.json as `lineage`, and how a
reproduction (`train.py --reproduce RUN_ID`) compares with the run it repeats.

    dataset_sha256  sha256 of the dataset as read (ct.workspace.dataset_files: the archive, or
                    the folder's batch files one after the other); cached in data/
    dataset_form    "archive" or "folder": which of the two the digest covers
    data_version    ct.data_version: the base's sha256 and every increment image's bytes
    test_version    ct.data_version.test_version: the test set the run's accuracy is measured
                    on (the base and the increments' test images); null when not known
    data            the images a run read: base_train, base_test, increment_train,
                    increment_test (counts) and increments (their names)
    seed            the config's seed
    commit          the code's commit (ct.workspace.current_commit), or null
    code_sha256     the digest of that commit's snapshot folder (ct.workspace.code_sha256), as
                    the pipeline passes it in ($CT_CODE_SHA256); null when not passed in
    image, image_id the container image's tag and id ($CT_IMAGE, $CT_IMAGE_ID); "local" for both
                    outside a container; image_id null when not passed in
    torch           torch.__version__
    device          the Compute's description, e.g. "cpu (bfloat16, 2 threads)"
    threads         torch.get_num_threads()
    model_sha256    sha256 of runs/<run-id>/model.pt as written
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ct import workspace as names
from ct.trainer.engine import Compute

# What must be equal for a reproduction to be expected to match bit for bit, and how to say it.
EXACT_KEYS = (("torch", "torch"), ("device", "device"), ("threads", "threads"),
              ("dataset_sha256", "dataset"), ("data_version", "data version"),
              ("commit", "commit"))
# Recorded only since increments exist: a run recorded before cannot differ in them.
NEWER_KEYS = frozenset({"data_version"})


def run_lineage(*, dataset_sha256: str, dataset_location: Path | None, data_version: str,
                data: Mapping[str, Any], seed: int, commit: str | None, compute: Compute,
                model_path: Path, test_version: str | None = None,
                env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    image, image_id = names.current_image(env)
    form = None if dataset_location is None else (
        "archive" if dataset_location.is_file() else "folder")
    return {
        "dataset_sha256": dataset_sha256, "dataset_form": form,
        "data_version": data_version, "test_version": test_version, "data": dict(data),
        "seed": seed, "commit": commit,
        "code_sha256": env.get(names.CODE_SHA256_ENV) or None,
        # the flags the pipeline asked for (CT_TRAIN_ARGS): with the commit and the data
        # version, what ct.pipeline.changes compares to skip an unchanged retrain
        "train_args": _flags(env.get(names.TRAIN_ARGS_ENV)),
        "image": image, "image_id": image_id, "torch": torch.__version__,
        "device": compute.describe(), "threads": torch.get_num_threads(),
        "model_sha256": names.hash_files([model_path]),
    }


def _flags(text: str | None) -> str | None:
    """CT_TRAIN_ARGS in one canonical spacing (shlex), as ct.pipeline.changes compares it; None
    outside the pipeline (unset)."""
    if text is None:
        return None
    try:
        return names.canonical_flags(text)
    except ValueError:
        return text


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] if len(text) == 64 or len(text) == 40 else text


def differences(recorded: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[str]:
    """Why a reproduction need not match exactly: what differs from the recorded lineage."""
    if not isinstance(recorded, Mapping):
        return ["the recorded run has no lineage to compare with"]
    return [f"{label} {_short(recorded.get(key))} vs {_short(current.get(key))} now"
            for key, label in EXACT_KEYS if recorded.get(key) != current.get(key)
            and not (key in NEWER_KEYS and key not in recorded)]


def reproduction_line(run_id: str, new_run_id: str, accuracy: float, recorded_accuracy: float,
                      recorded: Mapping[str, Any] | None, current: Mapping[str, Any],
                      device_type: str) -> str:
    """One line: the reproduced accuracy against the recorded one, and whether they should be
    equal."""
    difference = round(accuracy - recorded_accuracy, 2) or 0.0  # never "-0.00"
    reasons = differences(recorded, current)
    kind = "GPU" if device_type == "cuda" else "CPU"
    if reasons:
        verdict = "an exact match is not expected: " + ", ".join(reasons)
    elif difference == 0:
        verdict = f"exact: same {kind}, torch and threads"
    else:
        verdict = (f"NOT exact although {kind}, torch, threads, data and commit are the same: "
                   "a source of nondeterminism to look into")
    shown = f"{difference:+.2f}" if difference else "0.00"
    return (f"reproduced {run_id} as {new_run_id}: {accuracy:.2f}% vs recorded "
            f"{recorded_accuracy:.2f}% (difference {shown} points; {verdict})")
