#!/usr/bin/env bash
# The local chain runner: the jobs in Jenkins' order, without Jenkins (what `make run` runs).
#
#   scripts/pipeline.sh [REPO [REF]]    (default: CT_REPO_URL = this checkout, CT_GIT_REF = HEAD)
#
# job1 pull (the push is queued) -> then, for each queued push, oldest first: job2 image -> job3
# train -> job4 gate -> (below the threshold: job5 tune) -> job7 deploy (the champion, whether or
# not this chain replaced it: job7 does nothing when the service serves it already; CT_DEPLOY=0
# skips it); a failed train or tune run: job6 monitor --follow restarts it and then runs what
# follows every finished run (lib.sh after_run), as job4 does. When another chain is under way in the workspace (another pipeline.sh, or Jenkins), job3
# leaves the push queued and this runner stops at once: the runner of that chain trains it next.
# Exit 0 when every chain it ran went through; 1 when one failed (the others still ran).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

here="$(cd "$(dirname "$0")" && pwd)"

step() { # SCRIPT ARGS...: run one job, timing it
  local t0=$SECONDS rc=0
  log "---- $*"
  "$here/$1" "${@:2}" || rc=$?
  log "---- $1 exit $rc after $((SECONDS - t0)) s"
  return "$rc"
}

# chain: one queued push through job2 .. job5; 3 when job3 trained nothing (see job3-train.sh).
chain() {
  local rc=0
  # a push job2 fails on is still job3's to take: it fails there too, and the queue moves on
  step job2-image.sh >/dev/null || log "job2 failed: job3 takes the push and says what is wrong"
  step job3-train.sh || rc=$?
  if ((rc == 3)); then
    return 3
  elif ((rc == 0)); then
    step job4-gate.sh || return 1
  else
    # job6 restarts it and, once it has finished, runs what job4 runs (lib.sh after_run)
    log "training failed: job6 restarts it (at most CT_MAX_RESTARTS=$CT_MAX_RESTARTS times)"
    step job6-monitor.sh monitor --follow || {
      log "error: training failed and job6 gave up (see above)"
      return 1
    }
  fi
  if [[ "$(record_get gate TUNE)" == true ]]; then
    if ! step job5-tune.sh; then
      log "tuning failed: job6 restarts it"
      step job6-monitor.sh monitor --follow || {
        log "error: tuning failed and job6 gave up (see above)"
        return 1
      }
    fi
  fi
  # Jenkins starts job7 after every job4 and job5 that passed (jenkins/jobs.yaml)
  if [[ "$CT_DEPLOY" == 1 ]]; then
    step job7-deploy.sh || return 1
  fi
}

main() {
  local best rc commit failed=0 chains=0
  [[ "$CT_DEPLOY" =~ ^[01]$ ]] || die "CT_DEPLOY must be 1 (deploy the champion) or 0, not '$CT_DEPLOY'" 2
  resolve_runtime
  log "runtime: $CT_RUNTIME; workspace: $CT_WORKSPACE; threshold: $CT_THRESHOLD%"
  step job1-pull.sh "$@" >/dev/null
  while commit="$(pushes head)" && [[ -n "$commit" ]]; do
    rc=0
    chain || rc=$?
    ((rc != 3)) || break
    ((rc == 0)) || failed=1
    chains=$((chains + 1))
    # every chain takes its push off the queue; one that could not must not loop
    [[ "$(pushes head)" != "$commit" ]] || die "commit $commit is still queued after its chain failed (see above)"
  done
  if ((chains == 0)); then
    log "done: nothing trained now; the queued push trains when the chain under way has ended"
    return 0
  fi
  best="$(record_get promotion BEST_ACCURACY)"
  log "done: $chains push(es) trained, best model ${best:-?}% ($CT_WORKSPACE/$WS_BEST_FILE)"
  return "$failed"
}

main "$@"
