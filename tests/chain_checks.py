"""What a whole chain (scripts/pipeline.sh, the job scripts) must leave behind, on either
runtime: the chain tests' shared checks. Not a test module."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import read_props


def mail_checks(inbox, ws: Path, commit: str) -> None:
    assert len(inbox.messages) == 1
    msg = inbox.messages[0]
    best = json.loads((ws / "best.json").read_text())
    assert commit[:7] in msg["Subject"]
    assert f"{best['accuracy']:g}" in msg["Subject"] or str(best["accuracy"]) in msg["Subject"]
    assert msg["To"] == "team@example.com"


def assert_passed_and_promoted(ws: Path, inbox) -> None:
    commit = (ws / "commit.txt").read_text().strip()
    gate = read_props(ws / "gate.properties")
    assert gate["PASSED"] == "true"
    best = json.loads((ws / "best.json").read_text())
    metrics = json.loads((ws / "metrics.json").read_text())
    assert best["accuracy"] == metrics["accuracy"] >= 80
    assert best["commit"] == commit
    assert (ws / "best-model.pt").stat().st_size > 0
    assert read_props(ws / "status" / "train.properties")["EXIT_CODE"] == "0"
    mail_checks(inbox, ws, commit)


def assert_tuned(ws: Path, inbox, trials: int = 2) -> None:
    metrics = json.loads((ws / "metrics.json").read_text())
    assert metrics["mode"] == "tune"
    assert metrics["trials"] <= trials
    best = json.loads((ws / "best.json").read_text())
    assert (ws / "best-model.pt").exists()
    assert read_props(ws / "status" / "tune-rounds.properties")["ROUNDS"] == "1"
    assert len(inbox.messages) == 1
    body = inbox.messages[0].get_body(("plain",)).get_content()
    assert "tun" in inbox.messages[0]["Subject"].lower()
    for key in ("lr", "optimizer"):
        assert key in body
    assert best["accuracy"] >= 0
