"""What a whole chain (scripts/pipeline.sh, the job scripts) must leave behind, on either
runtime: the chain tests' shared checks. Not a test module."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.conftest import read_props


def mailed_accuracy(msg) -> float:
    """The accuracy a best-model or tuned mail announces ("[CT] ...: 81.27% at abc1234")."""
    found = re.search(r": (\d+(?:\.\d+)?)% at [0-9a-f]{7}$", msg["Subject"])
    assert found, msg["Subject"]
    return float(found.group(1))


def mailed_params(msg) -> dict[str, Any]:
    """The "parameters:" block of a mail's body (`  key = value`, a value in JSON unless it is
    a string) as a dict."""
    body = msg.get_body(("plain",)).get_content().replace("\r\n", "\n")  # as SMTP carried it
    assert "\nparameters:\n" in body, body
    block = body.split("\nparameters:\n", 1)[1].split("\n\n", 1)[0]
    params: dict[str, Any] = {}
    for line in block.splitlines():
        key, sep, value = line.strip().partition(" = ")
        assert sep, line
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


def mail_checks(inbox, ws: Path, commit: str) -> None:
    assert len(inbox.messages) == 1
    msg = inbox.messages[0]
    best = json.loads((ws / "best.json").read_text())
    assert f" at {commit[:7]}" in msg["Subject"]
    assert mailed_accuracy(msg) == best["accuracy"]
    assert msg["To"] == "team@example.com"


def assert_passed_and_promoted(ws: Path, inbox) -> None:
    commit = (ws / "commit.txt").read_text().strip()
    gate = read_props(ws / "gate.properties")
    assert gate["PASSED"] == "true"
    best = json.loads((ws / "best.json").read_text())
    metrics = json.loads((ws / "metrics.json").read_text())
    assert best["accuracy"] == metrics["accuracy"] >= 80
    assert best["commit"] == commit and best["run_id"] == metrics["run_id"]
    assert (ws / "best-model.pt").read_bytes() == (ws / metrics["model"]).read_bytes()
    assert read_props(ws / "status" / "train.properties")["EXIT_CODE"] == "0"
    mail_checks(inbox, ws, commit)


def assert_tuned(ws: Path, inbox, trials: int = 2) -> None:
    """One tuning round ran `trials` trials to their end (finished or pruned, none failed or cut
    by the budget), its best trial's model was tested and promoted, and the one mail announces
    that model's accuracy and that trial's parameters."""
    metrics = json.loads((ws / "metrics.json").read_text())
    assert metrics["mode"] == "tune"
    run_dir = ws / metrics["run_dir"]
    rows = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["trials"] == trials, rows
    assert all(row["status"] in ("done", "pruned") for row in rows), rows
    assert metrics["trials_finished"] + metrics["trials_pruned"] == trials
    winner = max((row for row in rows if row["status"] == "done"),
                 key=lambda row: row["val_accuracy"])
    round_best = json.loads((run_dir / "best.json").read_text())
    assert round_best["trial"] == winner["trial"]
    assert round_best["params"] == metrics["best_params"] == winner["params"]
    model = (run_dir / f"trial-{winner['trial']:03d}" / "model.pt").read_bytes()
    assert (run_dir / "model.pt").read_bytes() == model
    best = json.loads((ws / "best.json").read_text())
    assert best["run_id"] == metrics["run_id"] and best["accuracy"] == metrics["accuracy"]
    assert (ws / "best-model.pt").read_bytes() == model
    assert read_props(ws / "status" / "tune-rounds.properties")["ROUNDS"] == "1"
    assert len(inbox.messages) == 1
    msg = inbox.messages[0]
    assert msg["Subject"].startswith("[CT] tuning finished: ")
    assert mailed_accuracy(msg) == best["accuracy"]
    assert mailed_params(msg) == winner["params"]
