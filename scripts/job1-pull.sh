#!/usr/bin/env bash
# job1 pull: fetch the pushed commit, keep its code as a read-only snapshot and queue it.
#
#   scripts/job1-pull.sh [REPO [REF]]     (defaults: CT_REPO_URL, CT_GIT_REF)
#
# The commit is fetched (shallow) into the workspace's own git repository, code/repo.git, and its
# tree is written to code/<commit>/, read-only: the code every run of that commit trains. The
# push then waits in the queue (ct.pipeline.pushes: job3 trains it once no other commit's chain
# is under way), and snapshots nothing refers to any more are removed. The pipeline's state
# (data/, runs/, the best model, ...) is never touched. Writes commit.txt (the latest push) and
# prints the commit id. The repository and ref are untrusted, and so are the workspace
# repository's config and the pushed tree: ct.pipeline.push_source checks each before use (one
# line, exit 2, nothing changed), and git runs without hooks (repo_git).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

# fetch_commit REPO REF SHOWN: fetch just the one commit (shallow) and print its id; a commit id
# the server will not serve by id is found by fetching its branches instead (git's complaint about
# the first try is then no news). SHOWN: REPO for the log.
fetch_commit() {
  local quiet=/dev/stderr
  [[ ! "$2" =~ ^[0-9a-f]{7,40}$ ]] || quiet=/dev/null
  if repo_git fetch -q --depth 1 --no-tags -- "$1" "$2" 2>"$quiet"; then
    repo_git rev-parse --verify 'FETCH_HEAD^{commit}'
  elif [[ "$2" =~ ^[0-9a-f]{7,40}$ ]] &&
    repo_git fetch -q --no-tags -- "$1" '+refs/heads/*:refs/remotes/origin/*' &&
    repo_git rev-parse --verify "$2^{commit}" 2>/dev/null; then
    :
  else
    die "cannot fetch '$2' from $3" 2
  fi
}

main() {
  local repo="${1:-$CT_REPO_URL}" ref="${2:-$CT_GIT_REF}" commit keys shown
  (($# <= 2)) || die "usage: job1-pull.sh [REPO [REF]]" 2
  [[ -n "$repo" ]] || die "no repository: give one as argument or set CT_REPO_URL" 2
  # untrusted (a build parameter, a webhook): checked before git reads either; `shown` is the
  # repository without a password in its URL, for the log
  shown="$(ct_py ct.pipeline.push_source check -- "$repo" "$ref")" || exit $?
  # A local path is made absolute: the workspace's remote must not depend on the current folder,
  # and a bare word must never be taken for a remote of the workspace's repository.
  if [[ -d "$repo" ]]; then repo="$(cd -- "$repo" && pwd -P)"; fi
  mkdir -p "$CT_WORKSPACE/$WS_CODE_DIR"
  if [[ ! -d "$CT_WORKSPACE/$WS_CODE_REPO" ]]; then
    git init -q --bare "$CT_WORKSPACE/$WS_CODE_REPO"
  fi
  keys="$(repo_git config --local --name-only --list)" ||
    die "cannot read the config of $CT_WORKSPACE/$WS_CODE_REPO: remove that folder (job1 makes it again)" 2
  ct_py ct.pipeline.push_source config <<<"$keys" || exit $?
  commit="$(fetch_commit "$repo" "$ref" "$shown")"
  repo_git ls-tree -r -z --name-only "$commit" |
    ct_py ct.pipeline.push_source tree --commit "$commit" || exit $?
  ensure_snapshot "$commit"
  write_file "$CT_WORKSPACE/$WS_COMMIT_FILE" "$commit"
  keep_artifact "$CT_WORKSPACE/$WS_COMMIT_FILE"
  log "commit $commit of $shown $ref"
  pushes add --commit "$commit" --ref "$ref" >/dev/null || exit $?
  ct_py ct.pipeline.snapshots --workspace "$CT_WORKSPACE" prune >&2 || exit $?
  # pushes leave no refs here (only a by-id fallback keeps the branches): git's housekeeping drops
  # what no ref needs; the snapshots keep their code
  repo_git gc --auto --quiet || log "warning: git gc in $CT_WORKSPACE/$WS_CODE_REPO failed"
  echo "$commit"
}

main "$@"
