#!/usr/bin/env bash
# job5 tune: tune the code of the commit whose run job4 handed over (its snapshot, train.py --tune)
# in the tuning image on the workspace within the tuning budget,
# then what follows every run (lib.sh after_run): promote the best model when it beats the current
# best, and mail the best accuracy and params.
# At most CT_MAX_TUNE_ROUNDS rounds per commit: the chain never loops.
#
#   scripts/job5-tune.sh [--no-mail | --worker K]   (CT_TUNE_TRIALS, CT_TUNE_BUDGET seconds, CT_TUNE_ARGS; unset
#                                       trials and budget: train.py's defaults)
#
# CT_TUNE_WORKERS=N runs N tuning processes (local) or containers (docker) on the round: the first
# owns it (job6 restarts it; it tests the winner once), the others (`--worker K`) take its trials
# from the study until none is left. The study lives in the workspace (studies/), or in the
# database CT_TUNE_STORAGE names, which workers on other machines can share.
#
# --no-mail keeps the message in outbox/ only: Jenkins' job5 mails through email-ext itself.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

ONE_TO_64='^([1-9]|[1-5][0-9]|6[0-4])$' # --worker K and CT_TUNE_WORKERS

# tuning_rounds_left: a round is left for the commit (sets ROUND); otherwise that commit's chain
# ends here (after_run tuning-skipped), so the next queued push may train.
tuning_rounds_left() {
  ROUND="$(ct_process tune-round --commit "$CODE_COMMIT" --max-rounds "$CT_MAX_TUNE_ROUNDS")" || exit $?
  [[ "$ROUND" != none ]] && return 0
  ct_py ct.pipeline.after_run --workspace "$CT_WORKSPACE" tuning-skipped >/dev/null || exit $?
  return 1
}

# use_tuning_commit: the commit of the run handed to tuning; its snapshot is what tuning trains.
use_tuning_commit() {
  local commit
  commit="$(ct_py ct.pipeline.after_run --workspace "$CT_WORKSPACE" tuning-commit)" || exit $?
  use_commit "$commit"
}

# start_watchdog NAME SECONDS: stop the tuning process after SECONDS (ct.pipeline.process
# tune-deadline: well past its budget). train.py honours --time-budget at every epoch; this guards
# against a hang. Sets WATCHDOG.
start_watchdog() {
  local name="$1" deadline="$2"
  (
    # the sleep must not hold this job's output open, and must end with the watchdog
    sleep "$deadline" >/dev/null 2>&1 &
    sleeper=$!
    trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
    wait "$sleeper"
    log "tuning passed its hard deadline of ${deadline}s: stopping $name"
    stop_process "$name"
  ) &
  WATCHDOG=$!
}

# start_helpers IMAGE ARGS...: workers 2..CT_TUNE_WORKERS, each `train.py --tune --worker K`.
start_helpers() {
  local image="$1" k
  shift
  for ((k = 1; k < CT_TUNE_WORKERS; k++)); do
    start_process "tune-w$k" "$image" "$CODE_COMMIT" "$@" --worker "$k"
  done
}

# stop_helpers: the owner has tested the winner, so the helpers have nothing left to do; one that
# is still up (waiting, or killed mid-trial and not yet noticed) is stopped.
stop_helpers() {
  local k name
  for ((k = 1; k < CT_TUNE_WORKERS; k++)); do
    name="$(process_get "tune-w$k" CONTAINER)" || exit $?
    stop_process "$name" || true
  done
}

# tune_args: train.py's tuning flags for this job (sets ARGS): the same for every worker, since a
# helper finds the round by the study those flags name. --tune on every runtime: the snapshot's
# train.py runs, not the image's entry point.
tune_args() {
  local extra
  ARGS=(--tune)
  [[ -z "$CT_TUNE_TRIALS" ]] || ARGS+=(--trials "$CT_TUNE_TRIALS")
  [[ -z "$CT_TUNE_BUDGET" ]] || ARGS+=(--time-budget "$CT_TUNE_BUDGET")
  read -ra extra <<<"$CT_TUNE_ARGS"
  ARGS+=("${extra[@]}" "${DATA_FLAGS[@]}")
}

# help_round K: only helper K of the open round (a Jenkins fan-out build on another agent; see
# docs/jenkins.md, "Tuning on several agents"); no verdict, promotion or mail: the round's owner
# (job5) does those.
help_round() {
  local image code=0
  image="$(select_image tune)"
  tune_args
  start_process "tune-w$1" "$image" "$CODE_COMMIT" "${ARGS[@]}" --worker "$1"
  follow "tune-w$1" || code=$?
  ((code == 0)) || die "tuning worker $1 did not finish; the round's owner retries its trial"
}

main() {
  local delivery=() image code=0 helper=false worker='' deadline=''
  case "${1:-}" in
    "") ;;
    --no-mail) delivery=(--outbox-only) ;;
    --worker) helper=true worker="${2:-}" ;;
    *) die "unknown argument '$1'; usage: job5-tune.sh [--no-mail | --worker K]" 2 ;;
  esac
  # checked by pattern, not by arithmetic: bash would read 08 as octal and a[$(cmd)] as code
  if [[ "$helper" == true && ! "$worker" =~ $ONE_TO_64 ]]; then
    die "--worker takes a number in 1..64 (decimal, no leading zero), not '$worker'" 2
  fi
  [[ -z "$CT_TUNE_TRIALS" ]] || require_uint CT_TUNE_TRIALS "$CT_TUNE_TRIALS"
  [[ -z "$CT_TUNE_BUDGET" ]] || require_uint CT_TUNE_BUDGET "$CT_TUNE_BUDGET"
  require_uint CT_TUNE_WORKERS "$CT_TUNE_WORKERS"
  [[ "$CT_TUNE_WORKERS" =~ $ONE_TO_64 ]] ||
    die "CT_TUNE_WORKERS must be in 1..64 (decimal, no leading zero), not '$CT_TUNE_WORKERS'" 2
  require_uint CT_MAX_TUNE_ROUNDS "$CT_MAX_TUNE_ROUNDS"
  if [[ -n "$CT_TUNE_BUDGET" ]]; then
    deadline="$(ct_process tune-deadline --budget "$CT_TUNE_BUDGET")" || exit $?
  fi
  resolve_runtime
  use_tuning_commit
  if [[ "$helper" == true ]]; then
    ensure_data
    help_round "$worker"
    return
  fi
  tuning_rounds_left || exit 0
  ensure_data

  image="$(select_image tune)"
  tune_args
  start_process tune "$image" "$CODE_COMMIT" "${ARGS[@]}"
  start_helpers "$image" "${ARGS[@]}"
  WATCHDOG=
  if [[ -n "$deadline" ]]; then
    start_watchdog "$(process_get tune CONTAINER)" "$deadline"
  fi
  follow tune || code=$?
  [[ -z "$WATCHDOG" ]] || kill "$WATCHDOG" 2>/dev/null || true
  stop_helpers
  ((code == 0)) || exit 1

  after_run "${delivery[@]}"
  log "tuning round $ROUND of $CT_MAX_TUNE_ROUNDS for commit $CODE_COMMIT done"
}

main "$@"
