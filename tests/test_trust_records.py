"""The host trusts no record, build parameter or setting a training container or a pusher can
shape: each attack is planted the way the container (uid 1000, the workspace mounted read-write)
or a build parameter would plant it, and the real job script runs on the local runtime.

- bash never does arithmetic on a recorded value: a RESTARTS / ROUNDS that bash would run as
  code (`a[$(cmd)]`) is one line and exit 2 from ct.pipeline.process, and nothing runs;
- a settings number is decimal, checked before use (no octal 08, no expression);
- every .properties file is written by ct.pipeline.records.format_properties: read back by the
  real java.util.Properties as the same keys and values, with no "$" left for Jenkins' trigger to
  expand; a handed-over RUN_DIR that is no run folder is refused;
- job4's RUN_DIR parameter must name a run folder of the workspace (no '..', not absolute, no
  link); status/ reached through a link is neither read nor written;
- the retrain request (job6 check/weekly) carries the user and API token, its only credential
  (no token= in the query), intact whatever they hold, on no command line (a real HTTP server
  on loopback answers it).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import pytest

from ct.pipeline import process, records
from tests.conftest import REPO, required_tool, run_script

COMMIT = "c" * 40
STARTED = "2000-01-01T00:00:00Z"


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def plant(path: Path, text: str) -> bytes:
    """Write a file as the container would: raw bytes, no pipeline code involved."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode())
    return path.read_bytes()


def process_text(role: str = "train", **values: str) -> str:
    record = {"ROLE": role, "RUNTIME": "local", "CONTAINER": f"pid-{dead_pid()}",
              "IMAGE": "local", "COMMIT": COMMIT, "RESTARTS": "0", "STATUS": "running",
              "STARTED_AT": STARTED} | values
    return "".join(f"{key}={value}\n" for key, value in record.items())


def one_error_line(stderr: str) -> str:
    (line,) = [x for x in stderr.splitlines() if "error" in x or "ct." in x.split(":")[0]]
    return line


# ------------------------------------------------------------ bash arithmetic on record values


def test_a_restarts_value_bash_would_run_is_refused_by_job6(script_env, tmp_path):
    pwned = tmp_path / "outside" / "PWNED"
    pwned.parent.mkdir()
    ws = Path(script_env["CT_WORKSPACE"])
    record = ws / "status" / "train.properties"
    before = plant(record, process_text(STATUS="exited", EXIT_CODE="1",
                                        RESTARTS=f"CT_MAX_RESTARTS[$(touch {pwned})]"))
    proc = run_script("job6-monitor.sh", script_env, "monitor", check=False, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "RESTARTS=" in one_error_line(proc.stderr) and str(record) in proc.stderr
    assert not pwned.exists() and not (tmp_path / "PWNED").exists()
    assert record.read_bytes() == before  # nothing recorded
    assert not (ws / "status" / "train.log").exists()  # nothing restarted


def test_a_rounds_value_bash_would_run_is_refused_by_job5(script_env, source_repo, tmp_path):
    pwned = tmp_path / "outside" / "PWNED"
    pwned.parent.mkdir()
    ws = Path(script_env["CT_WORKSPACE"])
    commit = run_script("job1-pull.sh", script_env, str(source_repo)).stdout.strip()
    rounds = ws / "status" / "tune-rounds.properties"
    before = plant(rounds, f"COMMIT={commit}\nROUNDS=CT_MAX_TUNE_ROUNDS[$(touch {pwned})]\n")
    proc = run_script("job5-tune.sh", script_env, check=False, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "ROUNDS=" in one_error_line(proc.stderr) and str(rounds) in proc.stderr
    assert not pwned.exists() and not (tmp_path / "PWNED").exists()
    assert rounds.read_bytes() == before
    assert not (ws / "status" / "tune.properties").exists()  # no tuning started


@pytest.mark.parametrize(("setting", "args"), [
    ("CT_TUNE_WORKERS", ()),
    ("CT_TUNE_BUDGET", ()),
    ("", ("--worker", "08")),
    ("", ("--worker", "010")),
])
def test_job5_takes_settings_and_worker_numbers_as_decimals_only(script_env, tmp_path, setting,
                                                                 args):
    pwned = tmp_path / "PWNED"
    env = {**script_env, setting: f"1[$(touch {pwned})]"} if setting else script_env
    bad = env.get(setting, args[-1] if args else "")
    proc = run_script("job5-tune.sh", env, *args, check=False, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert bad in one_error_line(proc.stderr)
    assert not pwned.exists()
    assert not (Path(script_env["CT_WORKSPACE"]) / "status").exists()


def test_job5_watchdog_deadline_is_decimal_arithmetic_in_python(tmp_path):
    def deadline(budget: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ct.pipeline.process", "--workspace",
                               str(tmp_path), "tune-deadline", "--budget", budget], cwd=REPO,
                              capture_output=True, text=True, timeout=60)

    assert deadline("0100").stdout.strip() == "450"  # 100 + 50 + 300; bash would read octal 64
    for bad in ("1e3", "²", "1+1", "9999999999"):
        proc = deadline(bad)
        assert proc.returncode == 2 and proc.stdout == "", bad


def test_a_docker_record_names_only_this_workspaces_container(tmp_path):
    """job5 stops and job6 starts the container a record names: one the container chose (the
    model service's, another workspace's) is refused before any docker command sees it."""
    path = tmp_path / "status" / "tune-w1.properties"
    own = process.container_of(tmp_path, "tune-w1")
    good = process_text("tune-w1", RUNTIME="docker", CONTAINER=own,
                        IMAGE="ct-cifar-tune:0123456789abcdef")
    plant(path, good)
    assert process.load(tmp_path, "tune-w1")["CONTAINER"] == own
    before = plant(path, good.replace(own, "ct-serve-" + own[-12:]))
    proc = subprocess.run([sys.executable, "-m", "ct.pipeline.process", "--workspace",
                           str(tmp_path), "get", "--role", "tune-w1", "CONTAINER"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "ct-serve-" in proc.stderr and path.read_bytes() == before


# ------------------------------------------------------------ properties files


JAVA_READER = """
import java.io.*; import java.util.*;
public class Read { public static void main(String[] a) throws Exception {
  Properties p = new Properties();
  try (Reader r = new InputStreamReader(new FileInputStream(a[0]), "ISO-8859-1")) { p.load(r); }
  for (String k : new TreeSet<>(p.stringPropertyNames())) {
    StringBuilder v = new StringBuilder();
    for (char c : p.getProperty(k).toCharArray()) v.append(String.format("%04x", (int) c));
    System.out.println(k + " " + v); } } }
"""


def need_java() -> None:
    """java, to read a file as Jenkins does: a skip without it, a failure under CT_REQUIRE_JAVA=1
    (CI installs a JRE)."""
    required_tool(shutil.which("java"), "java", "apt-get install openjdk-17-jre-headless",
                  "CT_REQUIRE_JAVA")


def java_properties(path: Path, tmp_path: Path) -> dict[str, str]:
    """What the real java.util.Properties (Jenkins' reader) makes of a file."""
    source = tmp_path / "Read.java"
    source.write_text(JAVA_READER)
    out = subprocess.run(["java", str(source), str(path)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    pairs = (line.split(" ", 1) for line in out.splitlines())
    return {key: bytes.fromhex(hexed).decode("utf-16-be") for key, hexed in pairs}


def test_every_value_reads_back_whole_in_java_and_leaves_jenkins_nothing_to_expand(tmp_path):
    need_java()
    values = {"RUN_DIR": "runs/x\nCOMMIT=forged\r\nCT_THRESHOLD=0",
              "COMMIT": "${JENKINS_API_TOKEN} $SMTP_PASSWORD",
              "GAVE_UP": " lead\t\f\\ = : # ! \x00\x1b\x7f é 🙂 \\", "EMPTY": ""}
    path = tmp_path / "x.properties"
    path.write_text(records.format_properties(values, "test"), encoding="ascii")
    text = path.read_text()
    # parameterized-trigger 859.vb_e3907a_07a_16 FileBuildParameters.extractAllValues runs
    # env.expand over the file's text before Properties.load: no "$" may be left in it
    assert "$" not in text and text.count("\n") == len(values) + 1
    assert java_properties(path, tmp_path) == values
    assert records.parse_properties(text) == values


def test_a_properties_key_is_never_taken_as_given():
    for key in ("A\nB", "A=B", "a", ""):
        with pytest.raises(records.PipelineError, match="properties key"):
            records.format_properties({key: "v"}, "test")


def test_a_forged_run_dir_is_not_handed_over_to_job4(script_env, tmp_path):
    """metrics.json's run_dir with line breaks once added COMMIT and CT_THRESHOLD keys to
    handover.properties; now job6 refuses to hand it over: one line, exit 2, nothing written."""
    ws = Path(script_env["CT_WORKSPACE"])
    record = ws / "status" / "train.properties"
    before = plant(record, process_text(RESTARTS="1"))
    forged = "runs/train-1\\nCOMMIT=" + "d" * 40 + "\\nCT_THRESHOLD=0"
    plant(ws / "metrics.json", '{"accuracy": 90.0, "model": "runs/train-1/model.pt", '
          f'"run_dir": "{forged}", "run_id": "train-1", "mode": "train"}}')
    proc = run_script("job6-monitor.sh", script_env, "monitor", check=False, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert "handover.properties" in line and "RUN_DIR=" in line
    assert not (ws / "handover.properties").exists()
    assert record.read_bytes() == before  # not marked as handed over: the next cycle says it again


def test_the_handover_of_a_good_run_reads_back_in_java(tmp_path):
    need_java()
    (tmp_path / "runs" / "train-1").mkdir(parents=True)
    plant(tmp_path / "metrics.json", '{"accuracy": 90.0, "model": "runs/train-1/model.pt", '
          '"run_dir": "runs/train-1", "run_id": "train-1"}')
    process.write_handover(tmp_path, {"COMMIT": COMMIT})
    assert java_properties(tmp_path / "handover.properties", tmp_path) == {
        "COMMIT": COMMIT, "RUN_DIR": "runs/train-1"}


# ------------------------------------------------------------ RUN_DIR and status/ through links


@pytest.mark.parametrize("run_dir", ["../outside", "/etc", "runs/../../outside", "runs/linked",
                                     "-h", "runs/a\nb", "runs/missing"])
def test_job4_judges_only_a_run_folder_of_the_workspace(script_env, tmp_path, run_dir):
    ws = Path(script_env["CT_WORKSPACE"])
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "curves.png").write_bytes(b"secret")
    (ws / "runs").mkdir(parents=True)
    (ws / "runs" / "linked").symlink_to(outside, target_is_directory=True)
    plant(ws / "metrics.json", '{"accuracy": 90.0, "model": "m.pt", "run_dir": '
          f'"{run_dir}", "run_id": "x"}}'.replace("\n", "\\n"))
    plant(ws / "accuracy.txt", "90.0\n")
    artifacts = tmp_path / "artifacts"
    env = {**script_env, "CT_ARTIFACTS_DIR": str(artifacts)}
    proc = run_script("job4-gate.sh", env, run_dir, check=False, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "RUN_DIR" in one_error_line(proc.stderr) and "nothing judged" in proc.stderr
    assert not (ws / "gate.properties").exists() and not (ws / "best.json").exists()
    assert list(artifacts.iterdir()) == [] and sorted(os.listdir(outside)) == ["curves.png"]


def test_a_linked_status_folder_is_neither_read_nor_written(script_env, tmp_path):
    ws = Path(script_env["CT_WORKSPACE"])
    outside = tmp_path / "outside"
    # a host file the container wants to see: a bad value would be quoted in the error
    plant(outside / "train.properties", process_text(RESTARTS="host-secret-42"))
    before = sorted(os.listdir(outside))
    ws.mkdir()
    (ws / "status").symlink_to(outside, target_is_directory=True)
    proc = run_script("job6-monitor.sh", script_env, "monitor", check=False, cwd=tmp_path)
    assert proc.returncode == 2 and "symbolic link" in proc.stderr, proc.stderr
    assert "host-secret-42" not in proc.stderr
    start = subprocess.run(
        [sys.executable, "-m", "ct.pipeline.process", "--workspace", str(ws), "start", "--role",
         "tune", "--runtime", "local", "--container", "pid-1", "--image", "local", "--commit",
         COMMIT], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert start.returncode == 2 and "symbolic link" in start.stderr
    assert sorted(os.listdir(outside)) == before


# ------------------------------------------------------------ the retrain request's secrets


class _Jenkins(BaseHTTPRequestHandler):
    """Records each request, and which processes' command lines held a secret while it came."""

    requests: ClassVar[list] = []
    secrets: ClassVar[list[bytes]] = []
    answer: ClassVar[tuple[int, str]] = (201, "")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        seen = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                argv = cmdline.read_bytes()
            except OSError:
                continue
            seen += [argv for secret in _Jenkins.secrets if secret in argv]
        _Jenkins.requests.append((self.path, self.headers.get("Authorization"), seen))
        self.send_response(_Jenkins.answer[0])
        if _Jenkins.answer[1]:
            self.send_header("Location", _Jenkins.answer[1])
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def jenkins():
    servers = [HTTPServer(("127.0.0.1", 0), _Jenkins) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    _Jenkins.requests, _Jenkins.answer = [], (201, "")
    yield [f"http://127.0.0.1:{server.server_port}" for server in servers]
    for server in servers:
        server.shutdown()


def retrain_env(script_env: dict[str, str], url: str, **secrets: str) -> dict[str, str]:
    env = {**script_env, "JENKINS_URL": url, "JENKINS_USER": "ci-bot",
           "JENKINS_API_TOKEN": "api\"tok\\en\t'x$x y&z#", **secrets}
    _Jenkins.secrets = [env["JENKINS_API_TOKEN"].encode()]
    return env


def test_the_credentials_arrive_whole_and_are_on_no_command_line(script_env, source_repo,
                                                                jenkins, tmp_path):
    env = retrain_env(script_env, jenkins[0])
    run_script("job1-pull.sh", env, str(source_repo))  # nothing judged yet: a retrain
    proc = run_script("job6-monitor.sh", env, "weekly", cwd=tmp_path)
    ((path, auth, cmdlines),) = _Jenkins.requests
    assert urlsplit(path).path == "/job/job2/buildWithParameters"
    assert set(parse_qs(urlsplit(path).query)) == {"DATA_VERSION", "FORCE"}  # no token=
    user, _, token = base64.b64decode(auth.removeprefix("Basic ")).decode().partition(":")
    assert (user, token) == ("ci-bot", env["JENKINS_API_TOKEN"])
    assert cmdlines == []  # no process had a secret in its argv while the request came in
    for secret in _Jenkins.secrets:
        assert secret.decode() not in proc.stdout + proc.stderr
    workspace_files = [p for p in Path(env["CT_WORKSPACE"]).rglob("*") if p.is_file()]
    assert not any(s in p.read_bytes() for p in workspace_files for s in _Jenkins.secrets)


@pytest.mark.parametrize(("name", "value"), [
    ("JENKINS_USER", "ci-bot\nuser = \"evil:x\""),
    ("JENKINS_API_TOKEN", "api\r\nX-Evil: 1"),
    ("JENKINS_USER", "ci:bot"),
])
def test_a_credential_that_cannot_go_out_as_it_is_is_refused_by_name(script_env, source_repo,
                                                                     jenkins, name, value):
    env = retrain_env(script_env, jenkins[0], **{name: value})
    run_script("job1-pull.sh", env, str(source_repo))
    proc = run_script("job6-monitor.sh", env, "weekly", check=False)
    assert proc.returncode == 2 and name in one_error_line(proc.stderr)
    assert value not in proc.stderr and _Jenkins.requests == []


def test_a_redirect_is_not_followed_with_the_credentials(script_env, source_repo, jenkins):
    env = retrain_env(script_env, jenkins[0])
    _Jenkins.answer = (302, f"{jenkins[1]}/elsewhere")
    run_script("job1-pull.sh", env, str(source_repo))
    proc = run_script("job6-monitor.sh", env, "weekly", check=False)
    assert proc.returncode == 1 and "answered HTTP 302" in proc.stderr
    assert len(_Jenkins.requests) == 1  # the other server saw nothing: no token sent there
