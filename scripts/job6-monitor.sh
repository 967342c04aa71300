#!/usr/bin/env bash
# job6 monitor + weekly retrain.
#
#   scripts/job6-monitor.sh [monitor] [--follow]
#       One monitor cycle: a training or tuning process of this workspace that failed (non-zero
#       exit, OOM-killed) or vanished is started again (`docker start` of the same container, or a
#       new one with the same image and flags when it is gone); train.py resumes from the last
#       checkpoint. At most CT_MAX_RESTARTS restarts per run, then it reports that it gives up
#       (exit 1). --follow streams the restarted run to its end and retries within that limit
#       (what scripts/pipeline.sh uses); without it, the cycle returns at once (Jenkins, every 5 min).
#       A restarted run that has finished goes the way of every finished run (lib.sh after_run),
#       once: with --follow, this script runs it; without (Jenkins), ct.pipeline.process writes the
#       run's COMMIT and RUN_DIR to $CT_WORKSPACE/handover.properties, and job6's parameterized
#       trigger hands them to job4, which runs it. Every build of job6 first removes an earlier
#       build's hand-over. What to do about each process is ct.pipeline.process's decision (cycle);
#       a damaged record is one line and exit 2, with nothing done. A restart runs the same
#       commit's snapshot; with CT_PUSH_ORDER=newest a failed run of an older commit is not
#       restarted while a newer push waits (it says so). Without --follow, a cycle that finds the
#       workspace idle and a push waiting hands that push to job3 ($CT_WORKSPACE/next-push.properties,
#       job6's second trigger); with --follow, scripts/pipeline.sh trains the waiting pushes itself.
#   scripts/job6-monitor.sh check | weekly
#       Retrain when something changed: the latest push, the data version (new increments) or
#       CT_TRAIN_ARGS differ from every judged run's (ct.pipeline.changes; Jenkins' FORCE=true
#       retrains anyway). Nothing changed: one line ("nothing changed since run X"), exit 0.
#       Changed: POST $JENKINS_URL/job/$CT_RETRAIN_JOB/buildWithParameters with DATA_VERSION and
#       FORCE, as JENKINS_USER with its API token JENKINS_API_TOKEN (both from the environment; job2
#       has no build token, its matrix lets that user build it). Jenkins runs `check` every hour
#       (a data change is noticed within the hour) and `weekly` once a week; they decide alike.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

retrain_if_changed() {
  local said verdict version
  [[ -n "$JENKINS_USER" && -n "$JENKINS_API_TOKEN" ]] ||
    die "the retrain needs JENKINS_USER and JENKINS_API_TOKEN in the environment" 2
  [[ "${FORCE:-false}" =~ ^(true|false)$ ]] || die "FORCE must be true or false, not '$FORCE'" 2
  ensure_data
  said="$(changes "")" || exit $?
  read -r verdict version <<<"$said"
  [[ "$verdict" == changed ]] || return 0
  post_retrain "$version"
}

# post_retrain DATA_VERSION: start job2, passing the data version and FORCE.
# buildWithParameters, not build: job2 has parameters (COMMIT, DATA_VERSION, FORCE), and Jenkins
# answers a POST to /build of a parameterized job with HTTP 400 "This page expects a form
# submission" (tests/test_scripts_fast.py cites the core source). ct.pipeline.changes makes the
# request itself, with the user and API token from the environment: they are on no command line
# and in no file, whatever characters they hold.
post_retrain() {
  ct_py ct.pipeline.changes --workspace "$CT_WORKSPACE" retrain --data-version "$1" || exit $?
}

# monitor_role ROLE FOLLOW: 0 when fine, restarted or handed on; 1 when it gave up (now or
# earlier). Bounded: every pass returns or spends one of CT_MAX_RESTARTS restarts.
monitor_role() {
  local role="$1" follow=() action
  [[ "$2" == 1 ]] && follow=(--follow)
  while true; do
    look_at "$role"
    action="$(ct_process cycle --role "$role" --runtime "$CT_RUNTIME" \
      --max-restarts "$CT_MAX_RESTARTS" "${follow[@]}" "${SEEN[@]}")" || exit $?
    case "$action" in
      none | running | finished | handed-over) return 0 ;;
      gave-up) return 1 ;;
      judge)
        # shellcheck disable=SC2119 # the latest run is the restarted one: no --run-dir needed
        after_run
        ct_process handed-over --role "$role" || exit $?
        return 0
        ;;
      restart) restart "$role" ;;
      *) die "ct.pipeline.process decided '$action', which this script does not know" ;;
    esac
    ((${#follow[@]})) || return 0
    follow "$role" "$SINCE" || true
  done
}

main() {
  local mode="${1:-monitor}" follow_flag=0 arg rc=0 role
  # a hand-over is for the build that wrote it only
  rm -f "$CT_WORKSPACE/$WS_HANDOVER_FILE" "$CT_WORKSPACE/$WS_NEXT_PUSH_FILE"
  for arg in "${@:2}"; do
    case "$arg" in
      --follow) follow_flag=1 ;;
      *) die "usage: job6-monitor.sh [monitor [--follow] | check | weekly]" 2 ;;
    esac
  done
  case "$mode" in
    check | weekly) retrain_if_changed ;;
    monitor)
      require_uint CT_MAX_RESTARTS "$CT_MAX_RESTARTS"
      resolve_runtime
      for role in train tune; do monitor_role "$role" "$follow_flag" || rc=1; done
      if ((follow_flag == 0)); then pushes dispatch >/dev/null || exit $?; fi
      return "$rc"
      ;;
    *) die "usage: job6-monitor.sh [monitor [--follow] | check | weekly]" 2 ;;
  esac
}

main "$@"
