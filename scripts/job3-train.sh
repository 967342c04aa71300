#!/usr/bin/env bash
# job3 train: run the training image (or, on the local runtime, train.py on the host) on the
# workspace, stream its log, and record how it ended (exit code, OOM-killed) in the training
# process's record (ct.pipeline.process). Exit 0 when training finished; 1 when it failed, saying
# whether job6 restarts it (not for bad input, exit 2, or an OOM kill: a restart would only
# repeat them).
#
#   scripts/job3-train.sh            (extra train.py flags: CT_TRAIN_ARGS)
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

main() {
  local image args
  (($# == 0)) || die "usage: job3-train.sh (extra train.py flags: CT_TRAIN_ARGS)" 2
  require_workspace_code
  resolve_runtime
  ensure_data
  image="$(image_for train)"
  read -ra args <<<"$CT_TRAIN_ARGS"
  args+=("${DATA_FLAGS[@]}")
  start_process train "$image" "${args[@]}"
  follow train || exit 1
  log "training finished"
}

main "$@"
