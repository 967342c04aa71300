"""The chain end to end through scripts/pipeline.sh and the job scripts on the local runtime: real
git repositories, a real SMTP server (aiosmtpd)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.chain_checks import assert_passed_and_promoted, assert_tuned
from tests.conftest import read_props, run_script
from tests.test_report import WRAPPER, chromium

# A tuning budget no trial of these tiny rounds comes near: every configured trial must run to its
# end (assert_tuned), on a slow machine too.
UNREACHED_BUDGET = "3600"


def test_local_chain_passes_promotes_and_mails(source_repo, script_env, smtp_server):
    """The whole chain on a push (`make run`), no browser needed: trained, passed, promoted,
    mailed with the run's curves, and the report rewritten for this run."""
    smtp, inbox = smtp_server
    env = {**script_env, **smtp}
    proc = run_script("pipeline.sh", env, str(source_repo))
    ws = Path(env["CT_WORKSPACE"])
    assert_passed_and_promoted(ws, inbox)
    assert "job5" not in proc.stderr  # no tuning above the threshold
    assert not (ws / "status" / "tune.properties").exists()
    assert read_props(ws / "status" / "train.properties")["RUNTIME"] == "local"
    metrics = json.loads((ws / "metrics.json").read_text())
    attached = {part.get_filename(): part.get_content()
                for part in inbox.messages[0].iter_attachments()}
    assert attached["curves.png"] == (ws / metrics["run_dir"] / "curves.png").read_bytes()
    page = (ws / "report" / "index.html").read_text()
    assert metrics["run_id"] in page and metrics["lineage"]["dataset_sha256"] in page


@pytest.mark.slow  # a second chain; the fast suite's browser checks are test_report_browser.py
def test_local_chain_report_page_shows_the_run_in_a_browser(source_repo, script_env, browser,
                                                           tmp_path):
    """The report job4 wrote for a real run, as a browser renders it: the best model's figures
    and the run's curves image loaded (the page's own tests: tests/test_report_browser.py)."""
    # one epoch is a real run too, and the page does not care how good it is
    env = {**script_env, "CT_TRAIN_ARGS": "--batch-size 32 --epochs 1 --seed 1",
           "CT_THRESHOLD": "1"}
    run_script("pipeline.sh", env, str(source_repo))
    ws = Path(env["CT_WORKSPACE"])
    metrics = json.loads((ws / "metrics.json").read_text())
    index = ws / "report" / "index.html"
    dom = chromium("--dump-dom", index.as_uri(), cwd=tmp_path).stdout
    best = dom.split('id="best"', 1)[1].split("</section>", 1)[0]
    assert f"{metrics['accuracy']:g}%" in best and metrics["lineage"]["dataset_sha256"] in best
    assert len(re.findall(r'<tr class="run[^"]*" id="run-', dom)) == 1
    wrapper = tmp_path / "wrapper.html"
    wrapper.write_text(WRAPPER.replace("REPORT", index.as_uri()))
    out = chromium("--allow-file-access-from-files", "--virtual-time-budget=5000", "--dump-dom",
                   wrapper.as_uri(), cwd=tmp_path).stdout
    images = json.loads(re.search(r'<pre id="out">(.*?)</pre>', out, re.S).group(1)
                        .replace("&quot;", '"'))
    assert f"../{metrics['run_dir']}/curves.png" in [src for src, _, _ in images], images
    assert all(complete and width > 0 for _, complete, width in images), images  # none broken


@pytest.mark.slow
def test_local_chain_below_threshold_tunes_once(source_repo, script_env, smtp_server):
    smtp, inbox = smtp_server
    env = {**script_env, **smtp, "CT_THRESHOLD": "100", "CT_TUNE_BUDGET": UNREACHED_BUDGET}
    env["CT_TRAIN_ARGS"] = "--batch-size 64 --epochs 1 --lr 0.01 --seed 1"  # well below 100 %
    run_script("pipeline.sh", env, str(source_repo), timeout=900)
    ws = Path(env["CT_WORKSPACE"])
    assert read_props(ws / "gate.properties")["PASSED"] == "false"
    assert_tuned(ws, inbox)
    # a second job5 for the same commit does not tune again
    again = run_script("job5-tune.sh", env)
    assert "not tuning again" in again.stderr
    assert len(inbox.messages) == 1


@pytest.mark.slow
def test_local_job5_with_two_workers_shares_one_round(source_repo, script_env, smtp_server):
    """CT_TUNE_WORKERS=2 on the local runtime: a helper process beside the round's owner."""
    optuna = pytest.importorskip("optuna")
    smtp, inbox = smtp_server
    env = {**script_env, **smtp, "CT_THRESHOLD": "100", "CT_TUNE_WORKERS": "2",
           "CT_TUNE_TRIALS": "4", "CT_RUNTIME": "local", "CT_TUNE_BUDGET": UNREACHED_BUDGET}
    env["CT_TRAIN_ARGS"] = "--batch-size 64 --epochs 1 --lr 0.01 --seed 1"  # well below 100 %
    run_script("pipeline.sh", env, str(source_repo), timeout=900)
    ws = Path(env["CT_WORKSPACE"])
    helper = read_props(ws / "status" / "tune-w1.properties")
    assert helper["RUNTIME"] == "local" and helper["CONTAINER"].startswith("pid-")
    assert "worker 1 done" in (ws / "status" / "tune-w1.log").read_text()
    storage = optuna.storages.journal.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(ws / "studies" / "optuna.journal")))
    (name,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).trials
    assert len(trials) == 4 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert {t.user_attrs["worker"] for t in trials} == {"w0", "w1"}
    assert_tuned(ws, inbox, trials=4)
