#!/usr/bin/env bash
# The local chain runner: the six jobs in Jenkins' order, without Jenkins (what `make run` runs).
#
#   scripts/pipeline.sh [REPO [REF]]    (default: CT_REPO_URL = this checkout, CT_GIT_REF = HEAD)
#
# job1 pull -> job2 image -> job3 train -> job4 gate -> (below the threshold: job5 tune); a failed
# train or tune run: job6 monitor --follow restarts it and then runs what follows every finished
# run (lib.sh after_run), as job4 does. Exit 0 when the chain went through.
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

main() {
  local best
  resolve_runtime
  log "runtime: $CT_RUNTIME; workspace: $CT_WORKSPACE; threshold: $CT_THRESHOLD%"
  step job1-pull.sh "$@" >/dev/null
  step job2-image.sh >/dev/null
  if step job3-train.sh; then
    step job4-gate.sh
  else
    # job6 restarts it and, once it has finished, runs what job4 runs (lib.sh after_run)
    log "training failed: job6 restarts it (at most CT_MAX_RESTARTS=$CT_MAX_RESTARTS times)"
    step job6-monitor.sh monitor --follow || die "training failed and job6 gave up (see above)"
  fi
  if [[ "$(record_get gate TUNE)" == true ]]; then
    if ! step job5-tune.sh; then
      log "tuning failed: job6 restarts it"
      step job6-monitor.sh monitor --follow || die "tuning failed and job6 gave up (see above)"
    fi
  fi
  best="$(record_get promotion BEST_ACCURACY)"
  log "done: commit $(current_commit), best model ${best:-?}% ($CT_WORKSPACE/$WS_BEST_FILE)"
}

main "$@"
