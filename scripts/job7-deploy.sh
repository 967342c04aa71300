#!/usr/bin/env bash
# job7 deploy: serve the champion. When best.json's model has no export recorded
# (ct.pipeline.exported needs), export it to ONNX with the code of the commit that trained it
# (lib.sh export_champion: its training image on docker), make sure the model service runs
# (lib-process.sh ensure_service: the serving image's container, or python -m ct.serving on the
# local runtime), then ask the service for it (ct.pipeline.deploy deploy): the service smoke-tests
# it beside the model it serves and swaps only when it passes. A failed build (the service
# refused the champion, or a step before failed) keeps the model that serves, exits non-zero and
# mails why (ct.pipeline.notify --event deploy-failed). No champion yet: nothing to deploy, exit 0.
#
#   scripts/job7-deploy.sh             export if needed, start the service if needed, deploy
#   scripts/job7-deploy.sh rollback    back to the model served before (serving/deployed.json)
#   scripts/job7-deploy.sh stop        stop this workspace's service
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

STEP="starting job7"

# on_exit: what this build keeps, and, when it failed, the mail that says why (once per build:
# ct.pipeline.deploy begin forgot the previous build's outcome, so the mail tells this one's).
on_exit() {
  local rc=$? kept
  for kept in "$SERVE_RECORD" "$SERVE_DEPLOYED"; do
    [[ ! -f "$CT_WORKSPACE/$kept" ]] || keep_artifact "$CT_WORKSPACE/$kept"
  done
  if ((rc != 0)); then
    log "job7 failed while $STEP (exit $rc): mailing why"
    ct_py ct.pipeline.notify --workspace "$CT_WORKSPACE" --event deploy-failed \
      --note "job7 failed while $STEP (exit $rc)." >&2 || log "the failure mail was not sent (see above)"
  fi
  exit "$rc"
}

deploy() {
  local next word commit model
  STEP="checking the champion's export"
  next="$(ct_py ct.pipeline.exported needs --workspace "$CT_WORKSPACE")"
  read -r word commit model <<<"$next"
  case "$word" in
    none)
      log "no champion yet (no $WS_BEST_FILE): nothing to deploy"
      return 0
      ;;
    export)
      STEP="exporting the champion (commit $commit)"
      export_champion "$commit" "$model"
      ;;
    exported) ;;
    *) die "ct.pipeline.exported needs answered '$next', not none, export or exported" ;;
  esac
  STEP="starting the model service"
  ensure_service
  STEP="deploying the champion to $CT_SERVE_URL"
  ct_deploy deploy
  STEP="pruning $SERVE_MODELS_DIR/"
  ct_deploy prune >&2 || log "warning: $SERVE_MODELS_DIR/ was not pruned (see above); the deploy stands"
}

main() {
  local action="${1:-deploy}"
  (($# <= 1)) || die "usage: job7-deploy.sh [rollback | stop]" 2
  [[ "$action" =~ ^(deploy|rollback|stop)$ ]] ||
    die "unknown action '$action'; usage: job7-deploy.sh [rollback | stop]" 2
  [[ -d "$CT_WORKSPACE" ]] || die "no workspace at CT_WORKSPACE=$CT_WORKSPACE" 2
  serve_names
  if [[ "$action" == stop ]]; then
    stop_service
    return
  fi
  ct_deploy begin
  trap on_exit EXIT
  resolve_runtime
  if [[ "$action" == rollback ]]; then
    STEP="starting the model service"
    ensure_service
    STEP="rolling back at $CT_SERVE_URL"
    ct_deploy rollback
  else
    deploy
  fi
}

main "$@"
