#!/usr/bin/env bash
# job4 gate: validate accuracy.txt against CT_THRESHOLD (ct.gate check). At or above: promote the
# run's model when it beats the best one (ct.gate promote) and mail that the best model is created
# (ct.notify). Below: build the tuning image and hand over to job5 (gate.properties PASSED=false,
# status/image.properties TUNE_IMAGE). A missing/garbled/NaN/out-of-range accuracy: exit 2.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

W="$CT_WORKSPACE"
[[ -d "$W" ]] || die "no workspace at CT_WORKSPACE=$W" 2

ct_py ct.gate check --workspace "$W" --threshold "$CT_THRESHOLD" ||
  die "the accuracy gate could not judge this run (see the line above); nothing promoted" 2

passed="$(props_get "$W/gate.properties" PASSED)"
if [[ "$passed" == true ]]; then
  ct_py ct.gate promote --workspace "$W" || die "promotion failed (see the line above)" 2
  if [[ "$(props_get "$W/promotion.properties" PROMOTED)" == true ]]; then
    ct_py ct.notify --workspace "$W" --event best-model || die "the notification could not be sent (kept in $W/outbox/)"
  else
    log "the current best model stays (it is at least as good): no mail"
  fi
  exit 0
fi

log "below the threshold of $CT_THRESHOLD%: preparing the tuning image for job5"
require_workspace_code
resolve_runtime
if [[ "$CT_RUNTIME" == docker ]]; then
  ensure_image tune >/dev/null
else
  "$(dirname "$0")/job2-image.sh" tune >/dev/null
fi
log "handing over to job5 (gate.properties PASSED=false)"
