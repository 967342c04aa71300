"""What job1 takes from outside: the repository and ref it fetches, and the commit it snapshots.

    python3 -m ct.pipeline.push_source check -- REPO REF      before git sees either; prints
                                                             REPO as a log may show it
    python3 -m ct.pipeline.push_source config < NAMES        the workspace repository's own keys
    python3 -m ct.pipeline.push_source tree --commit C < PATHS     the commit's tracked paths

The repository and ref come from a build parameter or a webhook (Jenkins' GIT_URL and
GIT_COMMIT), so they are untrusted: a value git would read as an option ("--upload-pack=..."), a
transport that runs a program ("ext::sh -c ..."), a control character that forges a log line or
an unauthenticated transport (http://, git://) is refused before git runs. Accepted: an existing
local folder, file://, https:// and ssh:// URLs and scp-like `user@host:path`; a ref is HEAD, a
commit id or a name `git check-ref-format` accepts, never a refspec.

`config` reads `git config --local --name-only --list` of the workspace's repository
(code/repo.git) and refuses any key `git init --bare` does not write: a planted filter, fsmonitor,
hooks path, include or credential helper would run a program on the host at the next fetch or
archive. `tree` reads `git ls-tree -r -z --name-only` and refuses a commit that tracks a path
named like the workspace's state (status/, models/, best.json, ...): a push is code; its
snapshot never lands on the state, and a tree that carries state is a mistake or an attack. A
tree entry named .git (a fetch's fsck only warns of it), "." or ".." is refused too.
Every refusal is one line, exit 2, before anything of the workspace changes. Standard library only.
"""

from __future__ import annotations

import re
import sys
from argparse import ArgumentParser
from collections.abc import Iterable, Sequence
from pathlib import Path

from ct import workspace as names
from ct.pipeline import cli
from ct.pipeline.deploy_records import SERVING_DIR
from ct.pipeline.errors import PipelineError

MAX_REPO = 4096
MAX_REF = 255
SCHEMES = ("https", "ssh", "file")
HOST = r"(?:[A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\])"
URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/]*)(.*)")
AUTHORITY = re.compile(rf"(?:[A-Za-z0-9._~%+-]+(?::[^@]*)?@)?{HOST}(?::[0-9]{{1,5}})?")
SCP_LIKE = re.compile(rf"(?:([A-Za-z0-9._~+-]+)@)?({HOST}):(.*)")
HELPER = re.compile(r"[A-Za-z0-9+.-]*::")  # git's TRANSPORT::ADDRESS: git-remote-TRANSPORT runs
COMMIT_ID = re.compile(r"[0-9a-f]{7,64}")
REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")
# what `git init --bare` writes (some file systems add the last three), and an object format
INIT_KEYS = frozenset({"core.repositoryformatversion", "core.filemode", "core.bare",
                       "core.ignorecase", "core.precomposeunicode", "core.symlinks",
                       "extensions.objectformat"})
# The workspace's top-level names (ct.workspace, the deploy's serving/): never in a pushed tree.
STATE_NAMES = frozenset(path.split("/")[0] for path in (
    names.COMMIT_FILE, names.CODE_DIR, names.DATA_DIR, names.RUNS_DIR, names.ACCURACY_FILE,
    names.METRICS_FILE, names.GATE_PROPERTIES, names.HISTORY_FILE, names.PLOT_FILE,
    names.BEST_FILE, names.MODELS_DIR, names.BEST_MODEL, names.PROMOTION_PROPERTIES,
    names.OUTBOX_DIR, names.REPORT_DIR, names.TUNE_JOURNAL, names.STATUS_DIR,
    names.HANDOVER_PROPERTIES, names.NEXT_PUSH_PROPERTIES, names.ARTIFACTS_DIR, SERVING_DIR))


def shown(value: str) -> str:
    """A value for a one-line message: quoted, control characters escaped, at most 200 chars."""
    return ascii(value) if len(value) <= 200 else ascii(value[:200]) + "..."


def redacted(repo: str) -> str:
    """The repository as a log may show it: a password in an https:// or ssh:// URL as ***."""
    url = URL.fullmatch(repo)
    if not url or "@" not in url.group(2):
        return repo
    userinfo, host = url.group(2).rsplit("@", 1)
    user = userinfo.split(":", 1)[0] + (":***" if ":" in userinfo else "")
    return f"{url.group(1)}://{user}@{host}{url.group(3)}"


def has_control(value: str) -> bool:
    return any(ord(char) < 0x20 or ord(char) == 0x7F for char in value)


def check_common(what: str, value: str, limit: int) -> None:
    if not value or value.startswith("-"):
        raise PipelineError(f"the {what} {shown(value)} must not be empty or start with '-': git "
                            "would read it as an option; give a repository and a ref")
    if has_control(value):
        raise PipelineError(f"the {what} {shown(value)} holds a control character; give it "
                            "without newlines, tabs or escapes")
    if len(value) > limit:
        raise PipelineError(f"the {what} is {len(value)} characters long, more than {limit}")


def check_repo(given: str) -> str:
    """Why a repository is refused: raises PipelineError (the repository shown without its
    password); returns its kind (path, https, ssh, file)."""
    try:
        return repo_kind(given)
    except PipelineError as err:
        raise PipelineError(str(err).replace(shown(given), shown(redacted(given)))) from None


def repo_kind(repo: str) -> str:
    check_common("repository", repo, MAX_REPO)
    if HELPER.match(repo):
        raise PipelineError(f"the repository {shown(repo)} names a git transport helper "
                            "(HELPER::ADDRESS runs a program): give a folder, or an https://, "
                            "ssh:// or file:// URL")
    url = URL.fullmatch(repo)
    if url:
        scheme, authority, _path = url.groups()
        if scheme.lower() not in SCHEMES:
            raise PipelineError(f"the repository {shown(repo)} uses {scheme}://: only https://, "
                                "ssh:// and file:// are fetched (plain http:// and git:// are "
                                "not authenticated)")
        if any(char.isspace() for char in repo):
            raise PipelineError(f"the repository URL {shown(repo)} holds white space")
        if scheme.lower() != "file" and not AUTHORITY.fullmatch(authority):
            raise PipelineError(f"the repository URL {shown(repo)} has no valid host (a host "
                                "starts with a letter or digit)")
        return scheme.lower()
    colon, slash = repo.find(":"), repo.find("/")
    if colon > 0 and (slash < 0 or colon < slash):  # git reads it as scp-like ssh
        scp = SCP_LIKE.fullmatch(repo)
        if not scp or (scp.group(1) or "").startswith("-") or any(c.isspace() for c in repo):
            raise PipelineError(f"the repository {shown(repo)} is no valid user@host:path (a "
                                "host starts with a letter or digit)")
        return "ssh"
    if not Path(repo).is_dir():
        raise PipelineError(f"the repository {shown(repo)} is neither a URL (https://, ssh://, "
                            "file://, user@host:path) nor an existing folder")
    return "path"


def check_ref(ref: str) -> None:
    """Refuse a ref that is not HEAD, a commit id or a ref name (check-ref-format's rules)."""
    check_common("ref", ref, MAX_REF)
    if ref == "HEAD" or COMMIT_ID.fullmatch(ref):
        return
    parts = ref.split("/")
    if (ref.startswith("+") or ref == "@" or REF_FORBIDDEN.search(ref) or ref.endswith(("/", "."))
            or any(not part or part.startswith(".") or part.endswith(".lock")
                   for part in parts)):
        raise PipelineError(f"the ref {shown(ref)} is not a commit id, HEAD or a branch or tag "
                            "name (see git check-ref-format): give one of those")


def check_config(keys: Iterable[str]) -> None:
    """Refuse the workspace repository when its own config has a key job1 never writes."""
    extra = sorted({key.strip().lower() for key in keys if key.strip()} - INIT_KEYS)
    if extra:
        raise PipelineError(
            f"{names.CODE_REPO}'s config holds {', '.join(map(shown, extra[:5]))}, which job1 "
            "never writes (a filter, hook or helper there runs on this host): nothing fetched; "
            f"remove {names.CODE_REPO} (job1 makes it again) after finding out who wrote it")


def is_git_dir(part: str) -> bool:
    """.git as git itself guards it on every file system (".GIT", ".git. ", "git~1")."""
    return part.lower().rstrip(". ") in (".git", "git~1")


def check_tree(commit: str, paths: Iterable[str]) -> None:
    """Refuse a commit whose tree holds a .git (the snapshot has none: the container must see no
    repository) or a path that is not plain, or tracks a path named like the workspace's state."""
    paths = list(paths)
    odd = sorted(path for path in paths if any(is_git_dir(part) or part in ("", ".", "..")
                                               for part in path.split("/")))
    if odd:
        raise PipelineError(f"commit {commit} has a tree entry git itself would never check out: "
                            f"{shown(odd[0])}; push a commit made by git (no .git, . or .. in a "
                            "path)")
    found = sorted({path for path in paths if path.split("/")[0] in STATE_NAMES})
    if found:
        listed = ", ".join(map(shown, found[:3])) + (f" and {len(found) - 3} more"
                                                      if len(found) > 3 else "")
        raise PipelineError(
            f"commit {commit} tracks the pipeline's state: {listed} (the workspace's "
            f"{', '.join(sorted({p.split('/')[0] for p in found}))}); a push is code only: "
            "remove them from the repository (git rm -r --cached), commit and push again")


def split_names(data: bytes) -> list[str]:
    """NUL- or newline-separated names (git's -z lists, or plain ones)."""
    text = data.decode("utf-8", "surrogateescape")
    return [name for name in re.split(r"[\0\n]", text) if name]


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="ct.push_source", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="the repository and ref job1 was given")
    check.add_argument("repo")
    check.add_argument("ref")
    sub.add_parser("config", help="the repository's own config keys, on stdin")
    sub.add_parser("tree", help="the commit's tracked paths, on stdin").add_argument(
        "--commit", required=True)
    args = parser.parse_args(argv)

    def action() -> int:
        if args.command == "check":
            check_repo(args.repo)
            check_ref(args.ref)
            print(redacted(args.repo))
        elif args.command == "config":
            check_config(split_names(sys.stdin.buffer.read()))
        else:
            check_tree(args.commit, split_names(sys.stdin.buffer.read()))
        return 0

    return cli.run("ct.push_source", action)


if __name__ == "__main__":
    raise SystemExit(main())
