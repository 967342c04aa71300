#!/usr/bin/env bash
# A training or tuning process on either runtime (docker: a named, labelled container; local: python
# on this host): start it, follow it, see how it stands, restart it. Sourced by scripts/lib.sh (its
# settings and helpers), never run. Each process has a record, status/<role>.properties (how it
# ran and ended: RUNTIME, CONTAINER, IMAGE, COMMIT, RESTARTS, STATUS, EXIT_CODE, OOM_KILLED, ...),
# and its train.py arguments in status/<role>.args (NUL-separated, so no quoting games or eval).

# The container user: never root. As root on the host, the image's user (1000) gets the folders
# train.py writes to; otherwise the caller's own uid, so files stay theirs.
container_user() {
  if [[ -n "$CT_CONTAINER_USER" ]]; then
    printf '%s' "$CT_CONTAINER_USER"
  elif [[ "$(id -u)" == 0 ]]; then
    printf '1000:1000'
  else
    printf '%s:%s' "$(id -u)" "$(id -g)"
  fi
}

prepare_workspace_for() { # USER (uid:gid)
  mkdir -p "$CT_WORKSPACE/runs" "$CT_WORKSPACE/data"
  if [[ "$(id -u)" == 0 && "$1" != 0:* ]]; then
    chown "$1" "$CT_WORKSPACE" "$CT_WORKSPACE/data"
    chown -R "$1" "$CT_WORKSPACE/runs"
  fi
}

# launch ROLE IMAGE ARGS...: start the process detached (docker: a named, labelled container;
# local: python in the background of this shell) and set LAUNCHED to its container name / pid-N.
launch() {
  local role="$1" image="$2" name user commit
  shift 2
  name="$(container_name "$role")"
  commit="$(current_commit)"
  mkdir -p "$CT_WORKSPACE/status"
  if [[ "$CT_RUNTIME" == docker ]]; then
    if [[ "$(docker inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" == true ]]; then
      die "container $name is still running for this workspace; stop it or wait for it (job6 watches it)"
    fi
    docker rm -f "$name" >/dev/null 2>&1 || true
    user="$(container_user)"
    prepare_workspace_for "$user"
    # --init: a tiny init (docker-init) is PID 1 and passes SIGTERM on to train.py, so `docker stop`
    # and Jenkins' abort stop it at once (train.py keeps its last checkpoint).
    # CT_IMAGE, CT_IMAGE_ID: the run's lineage names the image it ran in
    local run=(docker run -d --init --name "$name" --label "ct.role=$role" --label "ct.workspace=$CT_WORKSPACE"
      --label "ct.commit=$commit" --user "$user" -e HOME=/tmp -e "CT_COMMIT=$commit"
      -e "CT_IMAGE=$image" -e "CT_IMAGE_ID=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null)"
      --shm-size 1g -v "$CT_WORKSPACE:/workspace" -w /workspace)
    [[ -n "$CT_GPUS" ]] && run+=(--gpus "$CT_GPUS")
    # the study's URL holds a password: passed by name, so it is in no argument list or record
    [[ -n "$CT_TUNE_STORAGE" ]] && run+=(-e CT_TUNE_STORAGE)
    # the limit is the limit: no extra swap, so an OOM kill is prompt and the same every time
    [[ -n "$CT_MEMORY" ]] && run+=(--memory "$CT_MEMORY" --memory-swap "$CT_MEMORY")
    "${run[@]}" "$image" "$@" >/dev/null || die "docker run of $image failed"
    LAUNCHED="$name"
  else
    local logf="$CT_WORKSPACE/status/$role.log"
    if [[ -f "$logf" ]]; then mv -f "$logf" "$logf.prev"; fi
    (cd "$CT_WORKSPACE" && CT_COMMIT="$commit" CT_IMAGE=local CT_IMAGE_ID=local \
      exec "$CT_PYTHON" train.py "$@") >"$logf" 2>&1 &
    LAUNCHED="pid-$!"
  fi
}

args_file() { printf '%s/status/%s.args' "$CT_WORKSPACE" "$1"; } # ROLE

# start_process ROLE IMAGE ARGS...: launch, and record it in status/<role>.properties (RESTARTS=0)
# and status/<role>.args (what restart passes again).
start_process() {
  local role="$1" image="$2" tmp
  shift 2
  launch "$role" "$image" "$@"
  tmp="$(mktemp "$(args_file "$role").XXXXXX.tmp")"
  if (($#)); then printf '%s\0' "$@" >"$tmp"; fi
  mv -f "$tmp" "$(args_file "$role")"
  write_file "$(state_file "$role")" "ROLE=$role
RUNTIME=$CT_RUNTIME
CONTAINER=$LAUNCHED
IMAGE=$image
COMMIT=$(current_commit)
RESTARTS=0
STATUS=running
EXIT_CODE=
OOM_KILLED=
STARTED_AT=$(date -u +%FT%TZ)
FINISHED_AT="
  log "$role started: $LAUNCHED ($image) $*"
}

# classify_end EXIT_CODE OOM_KILLED: how an ended training/tuning process ended, for job3, job5 and
# job6: "ok", "final <why>" when a restart would only repeat it (exit 2 is bad input; an OOM kill
# recurs under the same memory), else "failed <why>" (killed, crashed: job6 resumes it).
classify_end() {
  if [[ "$2" == true ]]; then
    echo "final OOM-killed (exit code $1, CT_MEMORY=${CT_MEMORY:-unset}): raise CT_MEMORY or lower --batch-size in CT_TRAIN_ARGS/CT_TUNE_ARGS, then run job3 again"
  elif [[ "$1" == 0 ]]; then
    echo ok
  elif [[ "$1" == 2 ]]; then
    echo "final bad input (exit code 2, see the log's last line): fix it, then push again or rerun job3"
  else
    echo "failed exit code $1${2:+, OOM-killed $2}"
  fi
}

# ended_badly ROLE: job3/job5's one line after a failed run: whether job6 will restart it.
ended_badly() {
  local file verdict
  file="$(state_file "$1")"
  verdict="$(classify_end "$(props_get "$file" EXIT_CODE)" "$(props_get "$file" OOM_KILLED)")"
  case "$verdict" in
    final*) die "$1 ended for good: ${verdict#final }; job6 will not restart it" ;;
    *) die "$1 ended with ${verdict#failed }; job6 (scripts/job6-monitor.sh) restarts it from its last checkpoint" ;;
  esac
}

# follow ROLE [SINCE]: stream the log until the process ends; record and return its exit code.
follow() {
  local role="$1" since="${2:-}" file name code oom status
  file="$(state_file "$role")"
  name="$(props_get "$file" CONTAINER)"
  if [[ "$(props_get "$file" RUNTIME)" == docker ]]; then
    docker logs -f ${since:+--since "$since"} "$name" 2>&1 || true
    code="$(docker wait "$name" 2>/dev/null || echo 255)"
    read -r oom status < <(docker inspect -f '{{.State.OOMKilled}} {{.State.Status}}' "$name" \
      2>/dev/null || echo "false vanished")
  else
    # a local process is followed by the shell that started it (start_process, same script)
    local pid="${name#pid-}" tailer
    tail -n +1 -f --pid "$pid" "$CT_WORKSPACE/status/$role.log" &
    tailer=$!
    code=0
    wait "$pid" || code=$?
    wait "$tailer" || true
    oom=false
    status=exited
    ((code != 137)) || oom=unknown
  fi
  props_set "$file" STATUS "$status" EXIT_CODE "$code" OOM_KILLED "$oom" \
    FINISHED_AT "$(date -u +%FT%TZ)"
  keep_artifact "$file"
  return "$code"
}

# observe ROLE: how the run's process stands. Prints "running", "ok", "gave-up", "final <why>" (an
# end that a restart would only repeat) or "failed <why>". An end seen here is recorded in the
# status file at once (STATUS=exited, EXIT_CODE, OOM_KILLED), so a later `docker rm` or
# `docker container prune` cannot turn a finished run into a vanished one.
observe() {
  local file name code="" oom=false
  file="$(state_file "$1")"
  name="$(props_get "$file" CONTAINER)"
  if [[ "$(props_get "$file" STATUS)" == gave-up ]]; then echo gave-up; return; fi
  if [[ "$(props_get "$file" STATUS)" == running ]]; then
    if [[ "$(props_get "$file" RUNTIME)" == docker ]]; then
      local inspected
      if inspected="$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}} {{.State.OOMKilled}}' "$name" 2>/dev/null)"; then
        local st
        read -r st code oom <<<"$inspected"
        case "$st" in running | restarting | created) echo running; return ;; esac
      fi
    elif kill -0 "${name#pid-}" 2>/dev/null; then
      echo running
      return
    fi
    # Ended. A docker container's exit code is known while it exists; a local process started by
    # an earlier cycle is no child of this one. Either way, a run that wrote its results after it
    # started has finished well.
    if [[ -z "$code" ]] && finished_since "$1" "$(props_get "$file" STARTED_AT)"; then code=0; fi
    if [[ -n "$code" ]]; then
      props_set "$file" STATUS exited EXIT_CODE "$code" OOM_KILLED "$oom" \
        FINISHED_AT "$(date -u +%FT%TZ)"
    fi
  fi
  code="$(props_get "$file" EXIT_CODE)"
  if [[ -z "$code" ]]; then
    echo "failed vanished (no $name, no exit code, no finished run)"
  else
    classify_end "$code" "$(props_get "$file" OOM_KILLED)"
  fi
}

# finished_since ROLE STARTED_AT: the workspace's metrics.json is a ROLE run's (train.py writes it
# when a run has ended well) and was written after STARTED_AT.
finished_since() {
  local since written
  [[ "$(latest_run_field mode)" == "$1" ]] || return 1
  since="$(date -u -d "$2" +%s 2>/dev/null)" || return 1
  written="$(stat -c %Y "$CT_WORKSPACE/metrics.json" 2>/dev/null)" || return 1
  ((written >= since))
}

# restart ROLE: start the same run again (train.py resumes from its last checkpoint); sets SINCE.
# Runs in this shell, not in $(...): a local process must stay this shell's child to be followed.
restart() {
  local role="$1" file name
  file="$(state_file "$role")"
  name="$(props_get "$file" CONTAINER)"
  # shellcheck disable=SC2034 # job6-monitor.sh follows the restarted run's log from here
  SINCE="$(date -u +%FT%TZ)"
  if [[ "$(props_get "$file" RUNTIME)" == docker ]] && docker inspect "$name" >/dev/null 2>&1; then
    docker start "$name" >/dev/null || die "docker start $name failed"
  else
    local args=()
    mapfile -d '' -t args <"$(args_file "$role")"
    CT_RUNTIME="$(props_get "$file" RUNTIME)"
    export CT_RUNTIME
    launch "$role" "$(props_get "$file" IMAGE)" "${args[@]}"
    props_set "$file" CONTAINER "$LAUNCHED"
  fi
  props_set "$file" STATUS running EXIT_CODE "" OOM_KILLED "" FINISHED_AT ""
}

