#!/usr/bin/env bash
# job5 tune: run the tuning image (train.py --tune) on the workspace within the tuning budget,
# then what follows every run (lib.sh after_run): promote the best model when it beats the current
# best, and mail the best accuracy and params.
# At most CT_MAX_TUNE_ROUNDS rounds per commit: the chain never loops.
#
#   scripts/job5-tune.sh [--no-mail]   (CT_TUNE_TRIALS, CT_TUNE_BUDGET seconds, CT_TUNE_ARGS)
#
# --no-mail keeps the message in outbox/ only: Jenkins' job5 mails through email-ext itself.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

delivery=mail
case "${1:-}" in
  "") ;;
  --no-mail) delivery=outbox-only ;;
  *) die "unknown argument '$1'; usage: job5-tune.sh [--no-mail]" 2 ;;
esac

require_uint CT_TUNE_TRIALS "$CT_TUNE_TRIALS"
require_uint CT_TUNE_BUDGET "$CT_TUNE_BUDGET"
require_uint CT_MAX_TUNE_ROUNDS "$CT_MAX_TUNE_ROUNDS"
require_workspace_code
resolve_runtime

W="$CT_WORKSPACE"
commit="$(current_commit)"
rounds_file="$W/status/tune-rounds.properties"
rounds=0
if [[ "$(props_get "$rounds_file" COMMIT)" == "$commit" ]]; then
  rounds="$(props_get "$rounds_file" ROUNDS)"
fi
if ((rounds >= CT_MAX_TUNE_ROUNDS)); then
  log "commit $commit was tuned $rounds time(s) already (CT_MAX_TUNE_ROUNDS=$CT_MAX_TUNE_ROUNDS): not tuning again"
  exit 0
fi
props_set "$rounds_file" COMMIT "$commit" ROUNDS "$((rounds + 1))"
ensure_data

image=local
args=(--trials "$CT_TUNE_TRIALS" --time-budget "$CT_TUNE_BUDGET")
read -ra extra <<<"$CT_TUNE_ARGS"
args+=("${extra[@]}" "${DATA_FLAGS[@]}")
if [[ "$CT_RUNTIME" == docker ]]; then
  image="$(props_get "$W/status/image.properties" TUNE_IMAGE)"
  if [[ -z "$image" || "$image" == local ]] || ! docker image inspect "$image" >/dev/null 2>&1; then
    image="$(ensure_image tune)"
  fi
else
  args=(--tune "${args[@]}") # the tuning image's entry point adds --tune by itself
fi

start_process tune "$image" "${args[@]}"
# A hard stop well past the budget: train.py honours --time-budget; this guards against a hang.
deadline=$((CT_TUNE_BUDGET + CT_TUNE_BUDGET / 2 + 300))
name="$(props_get "$(state_file tune)" CONTAINER)"
(
  # the sleep must not hold this job's output open, and must end with the watchdog
  sleep "$deadline" >/dev/null 2>&1 &
  sleeper=$!
  trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
  wait "$sleeper"
  log "tuning passed its hard deadline of ${deadline}s: stopping $name"
  if [[ "$CT_RUNTIME" == docker ]]; then docker stop "$name" >/dev/null; else kill "${name#pid-}"; fi
) &
watchdog=$!
code=0
follow tune || code=$?
kill "$watchdog" 2>/dev/null || true
((code == 0)) || ended_badly tune

after_run "$delivery"
log "tuning round $((rounds + 1)) of $CT_MAX_TUNE_ROUNDS for commit $commit done"
