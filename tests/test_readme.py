"""README.md and docs/*.md against what they describe.

- Every flag table (header `| flag | default | meaning |`) names each flag's default as
  `python train.py --help` prints it: a backticked value, or `—` where --help prints none.
  A flag --help does not know fails the test; docs/trainer.md lists every flag.
- README.md stays short, no document cites issue numbers, and every relative link resolves (to a
  file, and to a heading when it names an anchor).
- The retrain-by-hand command (the fenced block after `<!-- retrain-by-hand -->`) runs against a
  real loopback HTTP server: the request goes to /job/job2/buildWithParameters whether
  JENKINS_URL ends in `/` or not, and no secret is on curl's command line.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
DOCUMENTS = [README, *DOCS]
TRAINER_DOC = REPO / "docs" / "trainer.md"
README_MAX_LINES = 250
NO_DEFAULT = "—"  # a flag table's default cell for a flag whose --help prints no default
RETRAIN_MARKER = "<!-- retrain-by-hand -->"

FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*")
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
ISSUE = re.compile(r"\bissues?\s*#?\s*\d+|(?<![\w/&])#\d+\b", re.I)


def rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


# ---------------------------------------------------------------------------- train.py --help


def parse_help(text: str) -> dict[str, str | None]:
    """Each option of argparse's --help output -> its "(default: X)" (also "(...; default: X)"),
    None when its help prints no default. Options sharing an entry share its default."""
    defaults: dict[str, str | None] = {}
    entries: list[tuple[list[str], list[str]]] = []
    current: tuple[list[str], list[str]] | None = None
    started = False
    for line in text.splitlines():
        if not started:
            started = bool(re.match(r"^(options|optional arguments):", line))
            continue
        head = re.match(r"^  (-\S.*)$", line)
        if head:
            options, *rest = re.split(r"\s{2,}", head.group(1).strip(), maxsplit=1)
            current = (FLAG.findall(options), rest)
            entries.append(current)
        elif current is not None and line.startswith(" ") and line.strip():
            current[1].append(line)
        else:
            current = None  # a blank line or a group's header ends an entry
    for flags, lines in entries:
        words = " ".join(" ".join(lines).split())
        found = re.findall(r"[(;]\s*default:\s*([^()]*?)\s*\)", words)
        for flag in flags:
            defaults[flag] = found[-1] if found else None
    return defaults


@pytest.fixture(scope="session")
def help_defaults() -> dict[str, str | None]:
    env = {**os.environ, "COLUMNS": "10000", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"train.py --help failed:\n{proc.stderr}"
    defaults = parse_help(proc.stdout)
    assert {"--epochs", "--lr", "--preset", "--tune"} <= set(defaults), (
        f"could not parse train.py --help:\n{proc.stdout}")
    return defaults


def test_parse_help_reads_wrapped_and_shared_defaults():
    text = ("usage: x\n\noptions:\n  -h, --help  show\n\ntraining:\n  Text about defaults.\n\n"
            "  --epochs INT          passes (default:\n                        15)\n"
            "  --preset {a,b}\n                        named (config.py; default: a)\n"
            "  --on, --no-on         switch (default: True)\n  --out OUT   where\n")
    assert parse_help(text) == {"--help": None, "--epochs": "15", "--preset": "a", "--on": "True",
                                "--no-on": "True", "--out": None}


# ---------------------------------------------------------------------------- flag tables


@dataclass
class Row:
    path: Path
    line: int
    flags: list[str]
    default: str


def cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def flag_rows(path: Path) -> list[Row]:
    """The rows of every `| flag | default | meaning |` table in `path`."""
    rows: list[Row] = []
    in_table = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.startswith("|"):
            in_table = False
            continue
        row = cells(line)
        if [c.lower() for c in row[:2]] == ["flag", "default"]:
            in_table = True
        elif in_table and not re.fullmatch(r"[-: |]+", line):
            flags = FLAG.findall(row[0].replace("\\", ""))
            assert flags, f"{rel(path)}:{number}: a flag table's row names no --flag: {line}"
            rows.append(Row(path, number, flags, row[1] if len(row) > 1 else ""))
    return rows


def same(documented: str, printed: str) -> bool:
    if documented == printed:
        return True
    try:
        return float(documented) == float(printed)
    except ValueError:
        return False


def table_errors(rows: list[Row], help_defaults: dict[str, str | None]) -> list[str]:
    errors = []
    for row in rows:
        where = f"{rel(row.path)}:{row.line}"
        quoted = re.fullmatch(r"`([^`]*)`|(\"\")", row.default)
        if row.default != NO_DEFAULT and not quoted:
            errors.append(f"{where}: write the default as `value` (or {NO_DEFAULT} for none), "
                          f"not {row.default!r}")
            continue
        documented = None if row.default == NO_DEFAULT else (quoted.group(1) or "")
        for flag in row.flags:
            if flag not in help_defaults:
                errors.append(f"{where}: {flag} is not a train.py flag; --help knows "
                              f"{', '.join(sorted(help_defaults))}")
                continue
            printed = help_defaults[flag]
            if documented is None and printed is not None:
                errors.append(f"{where}: {flag}: --help prints the default {printed!r}; "
                              f"write `{printed}` instead of {NO_DEFAULT}")
            elif documented is not None and printed is None:
                errors.append(f"{where}: {flag}: the table says `{documented}` but --help prints "
                              f"no default for it; write {NO_DEFAULT} (or print it in --help)")
            elif documented is not None and printed is not None and not same(documented,
                                                                              printed):
                errors.append(f"{where}: {flag}: the table says `{documented}`, "
                              f"train.py --help says {printed!r}")
    return errors


def test_readme_has_a_flag_table_of_the_main_flags():
    flags = {flag for row in flag_rows(README) for flag in row.flags}
    assert {"--epochs", "--lr", "--preset", "--tune"} <= flags, sorted(flags)


@pytest.mark.parametrize("path", DOCUMENTS, ids=rel)
def test_flag_table_defaults_are_what_train_py_help_prints(path, help_defaults):
    errors = table_errors(flag_rows(path), help_defaults)
    assert not errors, "\n".join(errors)


def test_the_flag_check_fails_on_an_unknown_flag_and_a_wrong_default(tmp_path, help_defaults):
    doc = tmp_path / "doc.md"
    doc.write_text("| flag | default | meaning |\n| --- | --- | --- |\n"
                   "| `--no-such-flag N` | `1` | x |\n| `--epochs N` | `9999` | x |\n"
                   "| `--lr F` | 0.8 | x |\n")
    errors = "\n".join(table_errors(flag_rows(doc), help_defaults))
    assert "--no-such-flag is not a train.py flag" in errors
    assert "--epochs: the table says `9999`" in errors
    assert "write the default as `value`" in errors


def test_docs_trainer_lists_every_flag(help_defaults):
    documented = {flag for row in flag_rows(TRAINER_DOC) for flag in row.flags}
    missing = sorted(set(help_defaults) - documented - {"-h", "--help"})
    assert not missing, f"{rel(TRAINER_DOC)} lacks rows for {missing}"


# ---------------------------------------------------------------------------- the documents


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


@pytest.mark.parametrize("path", DOCUMENTS, ids=rel)
def test_no_issue_numbers(path):
    hits = [f"{rel(path)}:{n}: {line.strip()}"
            for n, line in enumerate(path.read_text().splitlines(), 1) if ISSUE.search(line)]
    assert not hits, "readers have no issue tracker:\n" + "\n".join(hits)


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M)}


@pytest.mark.parametrize("path", DOCUMENTS, ids=rel)
def test_relative_links_resolve(path):
    text = FENCE.sub("", path.read_text())
    errors = []
    targets = [m.group(1) for m in LINK.finditer(text)]
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            errors.append(f"{rel(path)}: {target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            errors.append(f"{rel(path)}: {target}: no heading #{anchor} in {linked.name}")
    assert not errors, "\n".join(errors)
    if path == README:
        assert any(t.startswith("docs/") for t in targets), "README links to no docs/ page"


def test_readme_links_every_docs_page():
    text = README.read_text()
    missing = [rel(doc) for doc in DOCS if f"({rel(doc)}" not in text]
    assert not missing, f"README.md does not link {missing}"


# ---------------------------------------------------------------------------- retrain by hand


def retrain_snippet() -> str:
    found = []
    for path in DOCUMENTS:
        text = path.read_text()
        for m in re.finditer(re.escape(RETRAIN_MARKER) + r"\s*\n```(?:bash|sh)?\n(.*?)^```",
                             text, re.S | re.M):
            found.append((path, m.group(1)))
    assert len(found) == 1, (f"expected one fenced block after {RETRAIN_MARKER} in README.md "
                             f"or docs/, found {[rel(p) for p, _ in found]}")
    return found[0][1]


class Recorder(BaseHTTPRequestHandler):
    requests: ClassVar[list[dict[str, str]]] = []

    def do_POST(self) -> None:
        # The request target as sent: http.server's self.path collapses a leading "//" to "/".
        self.requests.append({"method": "POST", "path": self.requestline.split()[1],
                              "auth": self.headers.get("Authorization", "")})
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self.requests.append({"method": "GET", "path": self.requestline.split()[1], "auth": ""})
        self.send_response(405)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def jenkins() -> Iterator[tuple[int, list[dict[str, str]]]]:
    Recorder.requests = []
    server = HTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], Recorder.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize("trailing_slash", ["/", ""], ids=["url-with-slash", "url-without"])
def test_retrain_by_hand_posts_to_build_with_parameters(jenkins, tmp_path, trailing_slash):
    """The documented command, run as written: one POST to job2's buildWithParameters with
    ct-retrain's user and API token as its only credential (job2 has no build token:
    tests/test_jenkins_security.py), the token whole however odd its characters (a quote, a tab,
    a line that a curl config would read as an option), and on no program's command line."""
    port, requests = jenkins
    # curl, base64 and tr on PATH that record their command lines, then run the real ones.
    shims, argv_file = tmp_path / "bin", tmp_path / "argv"
    shims.mkdir()
    for program in ("curl", "base64", "tr"):
        real = shutil.which(program)
        if real is None:
            pytest.skip(f"{program} is not installed")
        (shims / program).write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> "{argv_file}"\n'
                                     f'exec "{real}" "$@"\n')
        (shims / program).chmod(0o755)
    secrets = {"JENKINS_USER": "ci-user",
               "JENKINS_API_TOKEN": 'api-tok"en\t s3cret\nurl = "http://127.0.0.1:9/elsewhere"'}
    env = {**os.environ, **secrets, "PATH": f"{shims}:{os.environ['PATH']}",
           "JENKINS_URL": f"http://127.0.0.1:{port}{trailing_slash}"}
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(var, None)
    snippet = retrain_snippet()
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", snippet], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{snippet}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert len(requests) == 1, requests
    (request,) = requests
    assert request["path"].startswith("/job/job2/buildWithParameters"), request["path"]
    assert not request["path"].startswith("//")
    assert request["method"] == "POST"
    assert urlsplit(request["path"]).query == ""  # no token=: the API token is the credential
    pair = f"{secrets['JENKINS_USER']}:{secrets['JENKINS_API_TOKEN']}".encode()
    assert request["auth"] == f"Basic {base64.b64encode(pair).decode()}"
    argv = argv_file.read_text()
    assert "/job/job2/buildWithParameters" in argv  # the shims recorded curl's ...
    for piece in ("api-tok", "s3cret", "elsewhere"):  # ... and no piece of the token anywhere
        assert piece not in argv, f"the API token is on a command line: {argv}"
