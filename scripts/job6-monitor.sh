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
#       once: with --follow, this script runs it; without (Jenkins), it writes the run's COMMIT and
#       RUN_DIR to $CT_WORKSPACE/handover.properties, and job6's parameterized trigger hands them
#       to job4, which runs it. Every build of job6 first removes an earlier build's hand-over.
#   scripts/job6-monitor.sh weekly
#       Retrain: POST $JENKINS_URL/job/$CT_RETRAIN_JOB/buildWithParameters?token=$CT_TRIGGER_TOKEN
#       with the API credentials JENKINS_USER / JENKINS_API_TOKEN (all from the environment).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

weekly() {
  [[ -n "$JENKINS_USER" && -n "$JENKINS_API_TOKEN" && -n "$CT_TRIGGER_TOKEN" ]] ||
    die "the weekly retrain needs JENKINS_USER, JENKINS_API_TOKEN and CT_TRIGGER_TOKEN in the environment" 2
  # buildWithParameters, not build: job2 has a parameter (COMMIT), and Jenkins answers a POST to
  # /build of a parameterized job with HTTP 400 "This page expects a form submission"
  # (tests/test_scripts_fast.py cites the core source).
  local url="${JENKINS_URL%/}/job/$CT_RETRAIN_JOB/buildWithParameters" status
  # Credentials go to curl on stdin, not on its command line (which other users can read).
  status="$(printf 'user = "%s:%s"\n' "$JENKINS_USER" "$JENKINS_API_TOKEN" |
    curl -sS -K - -o /dev/null -w '%{http_code}' --max-time 30 -X POST -G \
      --data-urlencode "token=$CT_TRIGGER_TOKEN" "$url")" ||
    die "weekly retrain: cannot reach $url"
  [[ "$status" =~ ^2 ]] || die "weekly retrain: $url answered HTTP $status"
  log "weekly retrain requested: POST $url -> HTTP $status"
}

# hand_over ROLE FOLLOW: a run that job6 restarted and that has finished gets its verdict once:
# after_run here (FOLLOW=1), or job4 through the hand-over file (Jenkins).
hand_over() {
  local role="$1" follow="$2" file run_dir
  file="$(state_file "$role")"
  (("$(props_get "$file" RESTARTS)" > 0)) || return 0 # job3/job5 saw it end: they hand it on
  [[ "$(props_get "$file" HANDED_OVER)" != true ]] || return 0
  if [[ "$follow" == 1 ]]; then
    after_run mail
  else
    run_dir="$(latest_run_field run_dir)"
    write_file "$CT_WORKSPACE/$CT_HANDOVER_FILE" "COMMIT=$(props_get "$file" COMMIT)
RUN_DIR=$run_dir"
    log "$role: handing the restarted run ${run_dir:-?} over to job4 ($CT_HANDOVER_FILE)"
  fi
  props_set "$file" HANDED_OVER true
}

# give_up ROLE WHY: record that job6 stops restarting this run (its exit code stays recorded); the
# monitor stays red until a new run (job3/job5) replaces the record.
give_up() {
  props_set "$(state_file "$1")" STATUS gave-up GAVE_UP "$2"
  log "giving up on $1 $(props_get "$(state_file "$1")" CONTAINER): $2"
}

monitor_role() { # ROLE FOLLOW: 0 when fine or restarted, 1 when it gave up (now or earlier)
  local role="$1" follow="$2" file state restarts name
  file="$(state_file "$role")"
  [[ -f "$file" ]] || return 0
  name="$(props_get "$file" CONTAINER)"
  # Bounded: every pass either returns or uses up one of CT_MAX_RESTARTS restarts.
  while true; do
    state="$(observe "$role")"
    restarts="$(props_get "$file" RESTARTS)"
    case "$state" in
      running) log "$role: $name is running (restarts so far: ${restarts:-0})"; return 0 ;;
      ok) log "$role: $name finished"; hand_over "$role" "$follow"; return 0 ;;
      gave-up)
        log "$role: gave up on $name earlier ($(props_get "$file" GAVE_UP)); a new run (job3/job5) resets this"
        return 1
        ;;
      final*) give_up "$role" "${state#final } (a restart would only repeat it)"; return 1 ;;
    esac
    if ((${restarts:-0} >= CT_MAX_RESTARTS)); then
      give_up "$role" "${state#failed } after ${restarts:-0} restart(s) (CT_MAX_RESTARTS=$CT_MAX_RESTARTS)"
      return 1
    fi
    restarts=$((${restarts:-0} + 1))
    props_set "$file" RESTARTS "$restarts"
    log "$role: $name ${state#failed }: restarting it ($restarts of $CT_MAX_RESTARTS), resuming from its last checkpoint"
    restart "$role"
    name="$(props_get "$file" CONTAINER)"
    [[ "$follow" == 1 ]] || return 0
    follow "$role" "$SINCE" || true
  done
}

main() {
  local mode="${1:-monitor}" follow_flag=0 arg rc=0 role
  rm -f "$CT_WORKSPACE/$CT_HANDOVER_FILE" # a hand-over is for the build that wrote it only
  for arg in "${@:2}"; do
    case "$arg" in
      --follow) follow_flag=1 ;;
      *) die "usage: job6-monitor.sh [monitor [--follow] | weekly]" 2 ;;
    esac
  done
  case "$mode" in
    weekly) weekly ;;
    monitor)
      require_uint CT_MAX_RESTARTS "$CT_MAX_RESTARTS"
      resolve_runtime
      for role in train tune; do monitor_role "$role" "$follow_flag" || rc=1; done
      return "$rc"
      ;;
    *) die "usage: job6-monitor.sh [monitor [--follow] | weekly]" 2 ;;
  esac
}

main "$@"
