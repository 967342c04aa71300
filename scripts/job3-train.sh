#!/usr/bin/env bash
# job3 train: take the oldest queued push and train its code (the commit's read-only snapshot) in
# the training image (or, on the local runtime, with train.py on the host) on the workspace,
# stream its log, and record how it ended (exit code, OOM-killed) in the training process's record
# (ct.pipeline.process).
#
#   scripts/job3-train.sh            (extra train.py flags: CT_TRAIN_ARGS)
#
# Exit 0 when training finished, or when nothing changed since a judged run (the same commit, data
# version and CT_TRAIN_ARGS: ct.pipeline.changes; FORCE=true, Jenkins' parameter, trains anyway);
# 1 when it failed, saying whether job6 restarts it (not for bad
# input, exit 2, or an OOM kill: a restart would only repeat them); 3 when it trained nothing now:
# another commit's chain is under way (the push stays queued and trains after it) or no push waits
# (ct.pipeline.pushes decides and says which). A push taken and then not started (its commit has
# no train.py, its image does not build) fails here, naming it: run job1 for that commit (or push
# again) to queue it again.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

main() {
  local commit said image args
  (($# == 0)) || die "usage: job3-train.sh (extra train.py flags: CT_TRAIN_ARGS)" 2
  require_uint CT_MAX_RESTARTS "$CT_MAX_RESTARTS"
  resolve_runtime
  ensure_data # before taking a push: a setting to fix must not use up the push
  commit="$(pushes take)" || exit $?
  [[ -n "$commit" ]] || exit 3
  # the same code, data and flags as a judged run would train the same model again
  said="$(changes "$commit")" || exit $?
  if [[ "$said" == unchanged* ]]; then
    log "commit $commit: nothing trained (FORCE=true retrains anyway)"
    exit 0
  fi
  use_commit "$commit"
  image="$(select_image train)"
  read -ra args <<<"$CT_TRAIN_ARGS"
  args+=("${DATA_FLAGS[@]}")
  start_process train "$image" "$commit" "${args[@]}"
  follow train || exit 1
  log "training of commit $commit finished"
}

main "$@"
