"""The deploy's records in the workspace (ct.pipeline.deploy's, standard library only): the
exported models in models/ (champion-<sha256[:16]>.onnx, .json, -smoke.npz), what the service
should serve (serving/wanted.json, read by ct.serving), what deploy and rollback put there
(serving/deployed.json: current, previous, at), and the outcome of job7's last deploy
(status/deploy.json, which its failure mail reads). Every file is read without following a
symlink and checked field by field: the training container can write the workspace.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ct import atomic, untrusted
from ct import workspace as names
from ct.pipeline import serving_api
from ct.pipeline.errors import PipelineError
from ct.pipeline.promote import promotion_lock
from ct.pipeline.records import os_reason, utc_now
from ct.pipeline.serving_api import Swap, one_line

SERVING_DIR = "serving"  # host-written; the service's container mounts it read-only
WANTED = f"{SERVING_DIR}/wanted.json"  # what the service should serve (read by ct.serving)
DEPLOYED = f"{SERVING_DIR}/deployed.json"  # what deploy/rollback put there: current, previous
PID_FILE = f"{SERVING_DIR}/service.pid"  # the local runtime's service process
SERVICE_LOG = f"{SERVING_DIR}/service.log"
RECORD = f"{names.STATUS_DIR}/deploy.json"  # this job7 build's outcome, for its mail
SHELL_NAMES = {"SERVING_DIR": SERVING_DIR, "MODELS_DIR": names.MODELS_DIR, "DEPLOYED": DEPLOYED,
               "PID_FILE": PID_FILE, "SERVICE_LOG": SERVICE_LOG, "RECORD": RECORD}
_ONNX = re.compile(rf"{names.MODELS_DIR}/champion-([0-9a-f]{{16}})\.onnx")
_STORED = re.compile(r"champion-([0-9a-f]{16})(\.onnx|\.json|-smoke\.npz)")
_INCOMING = re.compile(r"\.champion-incoming.*\.tmp")  # a copy killed midway (atomic.py)
MAX_JSON = 1 << 20


@dataclass(frozen=True)
class Model:
    """One exported model in models/: what wanted.json and deployed.json name."""

    model: str  # models/champion-<sha256[:16]>.onnx
    sha256: str
    manifest: str  # models/champion-<sha256[:16]>.json
    commit: str = ""
    accuracy: float | None = None  # served_accuracy, measured by the export
    exported_at: str = ""

    @property
    def id(self) -> str:
        return self.sha256[:16]

    def describe(self) -> str:
        facts = [f"commit {self.commit[:7]}" if self.commit else "",
                 f"served accuracy {self.accuracy:g}%" if self.accuracy is not None else ""]
        facts = [fact for fact in facts if fact]
        return self.model + (f" ({', '.join(facts)})" if facts else "")


def model_from(obj: Any, where: str) -> Model:
    """A Model from a record's object, every field checked (the workspace is untrusted)."""
    if not isinstance(obj, dict):
        raise PipelineError(f"{where} is not an object")
    onnx, sha = obj.get("model", obj.get("onnx")), obj.get("sha256", obj.get("onnx_sha256"))
    match = _ONNX.fullmatch(onnx) if isinstance(onnx, str) else None
    if match is None:
        raise PipelineError(f"{where} names {one_line(onnx, 80)!r}, not "
                            f"{names.MODELS_DIR}/champion-<16 hex digits>.onnx")
    if not isinstance(sha, str) or not serving_api.SHA256.fullmatch(sha) \
            or sha[:16] != match.group(1):
        raise PipelineError(f"{where}: the sha256 does not match {onnx}")
    manifest = obj.get("manifest", f"{names.MODELS_DIR}/champion-{sha[:16]}.json")
    if manifest != f"{names.MODELS_DIR}/champion-{sha[:16]}.json":
        raise PipelineError(f"{where} names manifest {one_line(manifest, 80)!r}, not {onnx}'s")
    commit = obj.get("commit")
    accuracy = serving_api.number(obj.get("accuracy", obj.get("served_accuracy")))
    exported = obj.get("exported_at")
    return Model(model=onnx, sha256=sha, manifest=manifest,
                 commit=one_line(commit, 64) if isinstance(commit, str) else "",
                 accuracy=accuracy,
                 exported_at=one_line(exported, 40) if isinstance(exported, str) else "")


# ---------------------------------------------------------------- the workspace's records


def read_json(path: Path, remedy: str, root: Path | None = None) -> dict[str, Any] | None:
    """A JSON object from a plain file (None when there is none), as ct.untrusted reads it: no
    symbolic link followed (below `root`, the workspace, when given; else the file's own name),
    nor a FIFO or device that would block or never end, at most MAX_JSON bytes."""
    try:
        obj = untrusted.read_json(path, MAX_JSON, root=root)
    except untrusted.Missing:
        return None
    except untrusted.UntrustedFile as err:
        raise PipelineError(f"{path} cannot be read ({err.cause}); {remedy}") from None
    if not isinstance(obj, dict):
        raise PipelineError(f"{path} is not a JSON object of at most {MAX_JSON} bytes; {remedy}")
    return obj


def champion(workspace: Path) -> Model | None:
    """best.json's export, with the champion's commit; None without best.json. A champion not
    exported yet is a PipelineError: "export first"."""
    path = workspace / names.BEST_FILE
    best = read_json(path, "inspect it; job4 writes it when it promotes a model", workspace)
    if best is None:
        return None
    export = best.get("export")
    if export is None:
        raise PipelineError(f"{path} records no export of the champion: export first "
                            "(scripts/job7-deploy.sh exports it, then deploys it)")
    model = model_from(export, f"{path} \"export\"")
    commit = best.get("commit")
    return replace(model, commit=one_line(commit, 64) if isinstance(commit, str) else "")


@dataclass(frozen=True)
class Deployed:
    current: Model | None = None
    previous: Model | None = None
    at: str = ""
    rolled_back: str = ""  # the sha256 a rollback moved away from: deploy leaves it alone

    def to_json(self) -> dict[str, Any]:
        return {"current": self.current and asdict(self.current),
                "previous": self.previous and asdict(self.previous),
                "at": self.at, "rolled_back": self.rolled_back or None}


def read_deployed(workspace: Path) -> Deployed:
    path = workspace / DEPLOYED
    remedy = "move it away (the next deploy writes it again; rollback needs it)"
    obj = read_json(path, remedy, workspace)
    if obj is None:
        return Deployed()
    try:
        current, previous = (None if obj.get(key) is None else model_from(obj[key], key)
                             for key in ("current", "previous"))
    except PipelineError as err:
        raise PipelineError(f"{path} is damaged ({err}); {remedy}") from None
    back = obj.get("rolled_back")
    back = back if isinstance(back, str) and serving_api.SHA256.fullmatch(back) else ""
    at = obj.get("at")
    return Deployed(current, previous, one_line(at, 40) if isinstance(at, str) else "", back)


def stored_model(workspace: Path, sha256: str, known: Deployed) -> Model | None:
    """The model of that sha in models/ (a record's entry when one names it), None when its
    files are gone: what a rollback could go back to."""
    for model in (known.current, known.previous):
        if model is not None and model.sha256 == sha256:
            return model
    model = Model(f"{names.MODELS_DIR}/champion-{sha256[:16]}.onnx", sha256,
                  f"{names.MODELS_DIR}/champion-{sha256[:16]}.json")
    return model if (workspace / model.model).is_file() else None


def write(workspace: Path, rel: str, obj: dict[str, Any]) -> None:
    """Write W/rel atomically; its folder (status/, serving/) must be a real one of W: through
    a link, the record would be written outside the workspace."""
    try:
        untrusted.real_folder(workspace, Path(rel).parent.as_posix(), create=True)
    except untrusted.UntrustedFile as err:
        raise PipelineError(f"cannot write {workspace / rel} ({err}); move {err.path} away, "
                            "then rerun") from None
    try:
        atomic.write_json(workspace / rel, obj)
    except OSError as err:
        raise PipelineError(f"cannot write {workspace / rel} ({os_reason(err)}); make "
                            f"{workspace / rel} writable for this user, then rerun") from None


def save_outcome(workspace: Path, action: str, outcome: str, target: Model | None, url: str,
                 reason: str = "", swap: Swap | None = None, serving: str = "") -> None:
    """This build's outcome in status/deploy.json (one writer: here; one reader: mail_lines).
    `serving`: the model the service serves afterwards."""
    write(workspace, RECORD, {
        "action": action, "outcome": outcome, "reason": reason, "url": url, "at": utc_now(),
        "target": target and asdict(target), "smoke": swap.smoke if swap else {},
        "serving": serving or "no model"})


def prune_models(workspace: Path) -> tuple[list[str], int, set[str]]:
    """Delete the champion files no record names: (names deleted, bytes freed, ids kept). Under
    promotion's lock, because ct.pipeline.exported rewrites best.json under it: a model being
    recorded now is never deleted. Copies killed midway go once they are an hour old."""
    folder = workspace / names.MODELS_DIR
    with promotion_lock(workspace):
        known = read_deployed(workspace)
        keep = {m.id for m in (known.current, known.previous, champion_or_none(workspace))
                if m is not None}
        asked = read_json(workspace / WANTED, "move it away, then rerun", workspace) or {}
        if isinstance(asked.get("sha256"), str):
            keep.add(asked["sha256"][:16])  # a deploy under way
        gone, freed = [], 0
        try:  # through its descriptor, opened without following a link: never a file elsewhere
            with untrusted.folder(workspace, (names.MODELS_DIR,)) as fd:
                for name in sorted(os.listdir(fd)):
                    match = _STORED.fullmatch(name)
                    info = os.lstat(name, dir_fd=fd)
                    stale = _INCOMING.fullmatch(name) and time.time() - info.st_mtime > 3600
                    if (match and match.group(1) not in keep) or stale:
                        os.unlink(name, dir_fd=fd)
                        gone.append(name)
                        freed += info.st_size
        except untrusted.Missing:
            pass
        except (untrusted.UntrustedFile, OSError) as err:
            raise PipelineError(f"cannot prune {folder} ({err})") from None
    return gone, freed, keep


def champion_or_none(workspace: Path) -> Model | None:
    try:
        return champion(workspace)
    except PipelineError:
        return None  # not exported (or damaged): it names no champion file to keep


def mail_lines(workspace: Path) -> list[str]:
    """What job7's failure mail says about this build's deploy (status/deploy.json), if any."""
    try:
        record = read_json(workspace / RECORD, "", workspace) or {}
    except PipelineError:
        return []
    target, smoke = record.get("target"), record.get("smoke")
    smoke = {key: value for key, value in smoke.items() if key in serving_api.SMOKE_FIELDS
             and serving_api.number(value) is not None} if isinstance(smoke, dict) else {}
    failed = record.get("outcome") == "failed"
    rows = (("why:", record.get("reason")),
            ("wanted:", target.get("model") if isinstance(target, dict) else None),
            ("serving now:", record.get("serving") if failed else None),
            ("smoke test:", serving_api.smoke_text(smoke) if smoke else None),
            ("service:", record.get("url")))
    return [f"{label:<13}{one_line(value, 300)}" for label, value in rows
            if isinstance(value, str) and value]
