#!/usr/bin/env bash
# job1 pull: put the pushed commit's code into the workspace with git; keep the pipeline's state.
#
#   scripts/job1-pull.sh [REPO [REF]]     (defaults: CT_REPO_URL, CT_GIT_REF)
#
# The workspace is a git checkout (detached at the commit); data/, runs/, outbox/, the best model
# and the other state files are untracked and listed in .git/info/exclude, so checkout never
# touches them. Writes commit.txt (the commit id) and prints it.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

# The workspace's top folder may belong to the container user (see lib.sh container_user).
ws_git() { git -c safe.directory='*' -C "$CT_WORKSPACE" "$@"; }

# set_origin REPO: a git checkout in the workspace whose origin is REPO, with the pipeline's state
# excluded from git.
set_origin() {
  mkdir -p "$CT_WORKSPACE"
  if [[ ! -d "$CT_WORKSPACE/.git" ]]; then
    ws_git init -q
    log "new workspace checkout in $CT_WORKSPACE"
  fi
  if ws_git remote get-url origin >/dev/null 2>&1; then
    ws_git remote set-url origin "$1"
  else
    ws_git remote add origin "$1"
  fi
  local state=()
  read -ra state <<<"$WS_STATE_PATHS"
  printf '%s\n' "# pipeline state (ct/workspace.py STATE_PATHS): never tracked, never cleaned" \
    "${state[@]/#//}" >"$CT_WORKSPACE/.git/info/exclude"
}

# fetch_commit REPO REF: fetch just the one commit (shallow) and print its id; a commit id the
# server will not serve by id is found by fetching its branches instead.
fetch_commit() {
  if ws_git fetch -q --depth 1 --no-tags origin "$2" 2>/dev/null; then
    ws_git rev-parse --verify 'FETCH_HEAD^{commit}'
  elif [[ "$2" =~ ^[0-9a-f]{7,40}$ ]] &&
    ws_git fetch -q --no-tags origin '+refs/heads/*:refs/remotes/origin/*' &&
    ws_git rev-parse --verify "$2^{commit}" 2>/dev/null; then
    :
  else
    die "cannot fetch '$2' from $1" 2
  fi
}

main() {
  local repo="${1:-$CT_REPO_URL}" ref="${2:-$CT_GIT_REF}" commit
  (($# <= 2)) || die "usage: job1-pull.sh [REPO [REF]]" 2
  [[ -n "$repo" ]] || die "no repository: give one as argument or set CT_REPO_URL" 2
  # A local path is made absolute: the workspace's remote must not depend on the current folder.
  if [[ -d "$repo" ]]; then repo="$(cd "$repo" && pwd -P)"; fi
  set_origin "$repo"
  commit="$(fetch_commit "$repo" "$ref")"
  ws_git -c advice.detachedHead=false checkout -q --force --detach "$commit"
  write_file "$CT_WORKSPACE/$WS_COMMIT_FILE" "$commit"
  keep_artifact "$CT_WORKSPACE/$WS_COMMIT_FILE"
  log "workspace $CT_WORKSPACE at commit $commit ($repo $ref)"
  echo "$commit"
}

main "$@"
