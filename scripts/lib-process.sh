#!/usr/bin/env bash
# A training or tuning process on either runtime (docker: a named, labelled container; local: python
# on this host): start it, follow it, look at it, restart it. Sourced by scripts/lib.sh (its
# settings and helpers), never run. Each process has a record (how it runs and ended, its
# restarts) that only ct.pipeline.process reads and writes, and which decides what to do about
# it; its train.py arguments are kept in status/<role>.args (NUL-separated: no quoting games, no
# eval) for a restart.

ct_process() { ct_py ct.pipeline.process --workspace "$CT_WORKSPACE" "$@"; }
process_get() { ct_process get --role "$1" "$2"; } # ROLE KEY

# The container user: never root, nor the root group (CT_ALLOW_ROOT_CONTAINER=1 says you mean it),
# and a numeric uid:gid (a name, or a uid alone, takes its ids from the image's /etc/passwd, and
# the pushed Dockerfile builds the image; docker gives a uid with no entry gid 0). As root on
# the host, the image's user (1000) gets the folders train.py writes to; otherwise the caller's
# own uid, so files stay theirs.
container_user() {
  local user="$CT_CONTAINER_USER"
  if [[ -z "$user" && "$(id -u)" == 0 ]]; then
    user=1000:1000
  elif [[ -z "$user" ]]; then
    user="$(id -u):$(id -g)"
  fi
  [[ "$user" =~ ^[0-9]+:[0-9]+$ ]] ||
    die "CT_CONTAINER_USER must be a numeric uid:gid, not '$user' (a name or a lone uid takes its ids from the pushed image)" 2
  if [[ "$user" =~ ^0+:|:0+$ && "$CT_ALLOW_ROOT_CONTAINER" != 1 ]]; then
    die "the container would run the pushed code as root (CT_CONTAINER_USER or your uid:gid is '$user'): set CT_CONTAINER_USER to another uid:gid, or CT_ALLOW_ROOT_CONTAINER=1 if you mean it" 2
  fi
  printf '%s' "$user"
}

# prepare_workspace_for USER (uid:gid): as root, the container's user gets the workspace's top
# (train.py replaces accuracy.txt and metrics.json there), data/ and runs/. Never through a
# symlink below the workspace: -h changes a link itself, -R -P walks without following one (the
# sandbox's mounts have refused a symlinked runs/ or data/ already). CT_WORKSPACE, a setting, may
# be a link to the real folder.
prepare_workspace_for() {
  local ws
  if [[ "$(id -u)" == 0 && "$1" != 0:* ]]; then
    ws="$(cd "$CT_WORKSPACE" && pwd -P)"
    chown -h "$1" "$ws" "$ws/$WS_DATA_DIR"
    chown -R -P -h "$1" "$ws/$WS_RUNS_DIR"
  fi
}

# sandbox_args ROLE NAME COMMIT: the `docker run` options of every container this workspace
# starts (sets SANDBOX), and the train.py flags that go with them (sets INCREMENT_ARGS): named and
# labelled, not root and without capabilities, the mounts of ct.pipeline.sandbox (COMMIT's snapshot read-only at /code, the
# workspace at /workspace with code/, the records and what the host publishes hidden and models/
# read-only), CT_INCREMENTS_DIR read-only at /increments, the GPU and memory settings.
sandbox_args() {
  local role="$1" name="$2" commit="$3" user mounts
  user="$(container_user)" || exit $?
  mounts="$(ct_py ct.pipeline.sandbox --workspace "$CT_WORKSPACE" mounts --commit "$commit")" ||
    exit $?
  mapfile -t mounts <<<"$mounts"
  prepare_workspace_for "$user"
  # --init: a tiny init (docker-init) is PID 1 and passes SIGTERM on, so `docker stop` and
  # Jenkins' abort stop it at once (train.py keeps its last checkpoint).
  # --entrypoint: the code is the snapshot's, whatever the commit's Dockerfile says.
  # No capabilities and no privilege gain (a setuid file of the pushed image): training needs none.
  SANDBOX=(--init --name "$name" --label "ct.role=$role" --label "ct.workspace=$CT_WORKSPACE"
    --label "ct.commit=$commit" --user "$user" --cap-drop ALL --security-opt no-new-privileges
    -e HOME=/tmp -e "CT_COMMIT=$commit"
    -e PYTHONDONTWRITEBYTECODE=1 --shm-size 1g "${mounts[@]}" -w /workspace --entrypoint python)
  [[ -n "$CT_GPUS" ]] && SANDBOX+=(--gpus "$CT_GPUS")
  # the limit is the limit: no extra swap, so an OOM kill is prompt and the same every time
  [[ -n "$CT_MEMORY" ]] && SANDBOX+=(--memory "$CT_MEMORY" --memory-swap "$CT_MEMORY")
  INCREMENT_ARGS=()
  if [[ -n "$CT_INCREMENTS_DIR" ]]; then # increments kept outside the workspace
    SANDBOX+=(-v "$CT_INCREMENTS_DIR:/increments:ro")
    INCREMENT_ARGS=(--increments /increments)
  fi
}

# launch ROLE IMAGE COMMIT ARGS...: start train.py of COMMIT's snapshot detached (docker: a named,
# labelled container that sees the snapshot read-only at /code and the workspace at /workspace,
# with the other snapshots hidden; local: python in the background of this shell) and set
# LAUNCHED to its container name / pid-N.
launch() {
  local role="$1" image="$2" commit="$3" name code digest threads
  shift 3
  name="$(container_name "$role")"
  ensure_snapshot "$commit"
  code="$(snapshot_path "$commit")"
  require_increments_dir
  digest="$(ct_py ct.pipeline.snapshots --workspace "$CT_WORKSPACE" digest --commit "$commit")" ||
    exit $?
  threads="$(thread_budget "$role")" || exit $?
  # the local runtime's log and the records are written here by the host: never through a link
  [[ ! -L "$CT_WORKSPACE/$WS_STATUS_DIR" ]] ||
    die "$CT_WORKSPACE/$WS_STATUS_DIR is a symbolic link; move it away, then rerun" 2
  mkdir -p "$CT_WORKSPACE/$WS_STATUS_DIR"
  if [[ "$CT_RUNTIME" == docker ]]; then
    if [[ "$(docker inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" == true ]]; then
      die "container $name is still running for this workspace; stop it or wait for it (job6 watches it)"
    fi
    docker rm -f "$name" >/dev/null 2>&1 || true
    sandbox_args "$role" "$name" "$commit"
    # CT_IMAGE, CT_IMAGE_ID, CT_CODE_SHA256, CT_TRAIN_ARGS: the run's lineage names what it ran
    # and what it was asked (ct.pipeline.changes compares the request).
    # --cpus: the cgroup quota the trainer reads back (ct.cpu_budget), CT_THREADS: its share
    local run=(docker run -d "${SANDBOX[@]}" --cpus "$threads" -e "CT_THREADS=$threads"
      -e "CT_CODE_SHA256=$digest" -e CT_TRAIN_ARGS
      -e "CT_IMAGE=$image" -e "CT_IMAGE_ID=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null)")
    # the study's URL holds a password: passed by name, so it is in no argument list or record
    [[ -n "$CT_TUNE_STORAGE" ]] && run+=(-e CT_TUNE_STORAGE)
    # the trainer's test hook (ct.trainer.stopping), unset in use: a test stops the run at a point
    [[ -n "${CT_TEST_SIGNAL_AT:-}" ]] && run+=(-e CT_TEST_SIGNAL_AT)
    "${run[@]}" "$image" /code/train.py "$@" "${INCREMENT_ARGS[@]}" >/dev/null ||
      die "docker run of $image failed"
    LAUNCHED="$name"
  else
    local logf="$CT_WORKSPACE/$WS_STATUS_DIR/$role.log"
    [[ -z "$CT_INCREMENTS_DIR" ]] || set -- "$@" --increments "$CT_INCREMENTS_DIR"
    if [[ -f "$logf" ]]; then mv -f "$logf" "$logf.prev"; fi
    # the pushed code gets none of the host's secrets (a container gets only what -e names)
    (cd "$CT_WORKSPACE" && CT_COMMIT="$commit" CT_CODE_SHA256="$digest" CT_IMAGE=local \
      CT_IMAGE_ID=local CT_THREADS="$threads" PYTHONDONTWRITEBYTECODE=1 exec env \
      -u SMTP_PASSWORD -u SMTP_USER -u JENKINS_API_TOKEN -u JENKINS_USER \
      "$CT_PYTHON" "$code/train.py" "$@") >"$logf" 2>&1 &
    LAUNCHED="pid-$!"
  fi
}

# thread_budget ROLE: the CPU threads of one training (ct.cpu_budget): the host's cores shared
# among CT_TRAININGS_PER_HOST trainings, and a tuning round's share among its CT_TUNE_WORKERS.
thread_budget() {
  local workers=1
  [[ "$1" != tune* ]] || workers="$CT_TUNE_WORKERS"
  ct_py ct.cpu_budget --trainings-per-host "$CT_TRAININGS_PER_HOST" --tune-workers "$workers"
}

args_file() { printf '%s/%s/%s.args' "$CT_WORKSPACE" "$WS_STATUS_DIR" "$1"; } # ROLE

# start_process ROLE IMAGE COMMIT ARGS...: launch, record it (RESTARTS=0) and keep its arguments
# for a restart.
start_process() {
  local role="$1" image="$2" commit="$3" tmp
  shift 3
  launch "$role" "$image" "$commit" "$@"
  tmp="$(mktemp "$(args_file "$role").XXXXXX.tmp")"
  if (($#)); then printf '%s\0' "$@" >"$tmp"; fi
  mv -f "$tmp" "$(args_file "$role")"
  ct_process start --role "$role" --runtime "$CT_RUNTIME" --container "$LAUNCHED" \
    --image "$image" --commit "$commit"
  log "$role started: $LAUNCHED ($image, commit $commit) $*"
}

# follow ROLE [SINCE]: stream the log until the process ends and record how it ended; non-zero,
# after one line saying whether job6 restarts it, when it did not finish well.
follow() {
  local role="$1" since="${2:-}" name code oom rc=0
  name="$(process_get "$role" CONTAINER)" || exit $?
  if [[ "$CT_RUNTIME" == docker ]]; then
    docker logs -f ${since:+--since "$since"} "$name" 2>&1 || true
    # a vanished container: docker prints a blank line before failing, so the fallback replaces
    # its output rather than being appended to it
    code="$(docker wait "$name" 2>/dev/null)" || code=255
    oom="$(docker inspect -f '{{.State.OOMKilled}}' "$name" 2>/dev/null)" || oom=false
  else
    # a local process is followed by the shell that started it (start_process, same script)
    local pid="${name#pid-}" tailer
    tail -n +1 -f --pid "$pid" "$CT_WORKSPACE/$WS_STATUS_DIR/$role.log" &
    tailer=$!
    code=0
    wait "$pid" || code=$?
    wait "$tailer" || true
    oom=false
    ((code != 137)) || oom=unknown
  fi
  ct_process ended --role "$role" --exit-code "$code" --oom "$oom" || rc=$?
  keep_artifact "$CT_WORKSPACE/$WS_STATUS_DIR/$role.properties"
  return "$rc"
}

# stop_process NAME: stop a process this workspace started (SIGTERM: train.py keeps its last
# checkpoint); non-zero when it was not running.
stop_process() {
  if [[ "$CT_RUNTIME" == docker ]]; then
    docker stop "$1" >/dev/null 2>&1
  else
    kill "${1#pid-}" 2>/dev/null
  fi
}

# look_at ROLE: how the process looks right now, as flags of `ct.pipeline.process cycle` (SEEN).
# shellcheck disable=SC2034 # SEEN is read by job6-monitor.sh
look_at() {
  local name state code oom
  name="$(process_get "$1" CONTAINER)" || exit $?
  SEEN=(--seen missing)
  if [[ -z "$name" ]]; then
    return 0
  elif [[ "$CT_RUNTIME" == docker ]]; then
    local seen
    if seen="$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}} {{.State.OOMKilled}}' \
      "$name" 2>/dev/null)"; then
      read -r state code oom <<<"$seen"
      case "$state" in
        running | restarting | created | paused) SEEN=(--seen running) ;;
        *) SEEN=(--seen ended --exit-code "$code" --oom "$oom") ;;
      esac
    fi
  elif kill -0 "${name#pid-}" 2>/dev/null; then
    SEEN=(--seen running)
  fi
}

# seen_spec ROLE: look_at as one word for ct.pipeline.pushes: ROLE=running|missing|ended:CODE:OOM.
seen_spec() {
  local state
  look_at "$1"
  state="${SEEN[1]}"
  [[ "$state" != ended ]] || state+=":${SEEN[3]}:${SEEN[5]}"
  printf '%s=%s' "$1" "$state"
}

# pushes COMMAND [ARGS...]: ct.pipeline.pushes on this workspace; take and dispatch are given what
# the train and tune processes look like now.
pushes() {
  local seen=() train tune
  if [[ "$1" == take || "$1" == dispatch ]]; then
    train="$(seen_spec train)" || exit $?
    tune="$(seen_spec tune)" || exit $?
    seen=(--max-restarts "$CT_MAX_RESTARTS" --seen "$train" --seen "$tune")
  fi
  ct_py ct.pipeline.pushes --workspace "$CT_WORKSPACE" "$@" "${seen[@]}"
}

# restart ROLE: start the same run again (train.py resumes from its last checkpoint: same commit,
# same snapshot, same flags) on the runtime of the settings; sets SINCE. Runs in this shell, not in $(...): a local process must
# stay this shell's child to be followed.
restart() {
  local role="$1" name image commit args=()
  name="$(process_get "$role" CONTAINER)" || exit $?
  image="$(process_get "$role" IMAGE)" || exit $?
  commit="$(process_get "$role" COMMIT)" || exit $?
  # shellcheck disable=SC2034 # job6-monitor.sh follows the restarted run's log from here
  SINCE="$(date -u +%FT%TZ)"
  if [[ "$CT_RUNTIME" == docker ]] && docker inspect "$name" >/dev/null 2>&1 &&
    docker start "$name" >/dev/null 2>&1; then
    LAUNCHED="$name"
  else
    # gone, or it cannot start as it was (a record it mounted read-only is gone): a new one
    [[ "$CT_RUNTIME" != docker ]] || log "container $name cannot start again as it was: a new one resumes its run"
    mapfile -d '' -t args <"$(args_file "$role")"
    launch "$role" "$image" "$commit" "${args[@]}"
  fi
  ct_process restarted --role "$role" --container "$LAUNCHED" || exit $?
}

# ----------------------------------------------------------------------------------- the service
# The model service (python -m ct.serving) serves what serving/wanted.json names; job7 starts it
# and ct.pipeline.deploy talks to it. One per workspace: docker, the container ct-serve-<id>
# (restarted by the engine, so it outlives job7 and a reboot); local, a background process whose
# pid is in serving/service.pid. It reads only models/ and serving/.

ct_deploy() { ct_py ct.pipeline.deploy --workspace "$CT_WORKSPACE" "$@"; }

# serve_names: the deploy's file names from their one owner (ct.pipeline.deploy names), as
# SERVE_<NAME>: SERVE_SERVING_DIR, SERVE_MODELS_DIR, SERVE_PID_FILE, SERVE_SERVICE_LOG, ...
serve_names() {
  local lines key value
  lines="$(ct_py ct.pipeline.deploy names)" || exit $?
  while IFS='=' read -r key value; do printf -v "SERVE_$key" '%s' "$value"; done <<<"$lines"
}

# ensure_service: the service runs for this workspace and answers at CT_SERVE_URL. Ours is kept
# when it runs (on docker: from the serving image of this checkout; a container of an older
# image is replaced); with none of ours, a service that answers at CT_SERVE_URL is used as it is
# (one you run yourself); otherwise ours is started, on CT_SERVE_PORT.
ensure_service() {
  local name
  resolve_runtime
  serve_names
  mkdir -p "$CT_WORKSPACE/$SERVE_MODELS_DIR" "$CT_WORKSPACE/$SERVE_SERVING_DIR"
  if [[ "$CT_RUNTIME" == docker ]]; then
    local image
    image="$(serve_image)"
    name="$(container_name serve)"
    if [[ "$(docker inspect -f '{{.State.Running}} {{.Config.Image}}' "$name" 2>/dev/null)" == "true $image" ]]; then
      log "the service runs: container $name ($image)"
      return 0
    fi
    if docker inspect "$name" >/dev/null 2>&1; then
      log "replacing container $name (stopped, or of an older serving image) with one of $image"
      docker rm -f "$name" >/dev/null
    elif ct_deploy running 2>/dev/null; then
      log "a service this workspace did not start answers at $CT_SERVE_URL: deploying to it"
      return 0
    fi
    start_service_container "$name" "$image"
  elif ct_deploy local-pid >/dev/null; then
    log "the service runs: pid $(ct_deploy local-pid), $CT_WORKSPACE/$SERVE_SERVICE_LOG"
    return 0
  elif ct_deploy running 2>/dev/null; then
    log "a service this workspace did not start answers at $CT_SERVE_URL: deploying to it"
    return 0
  else
    start_service_process
    name="pid $(ct_deploy local-pid || true), log $CT_WORKSPACE/$SERVE_SERVICE_LOG"
  fi
  ct_deploy running --wait 120 || die "the service did not answer at $CT_SERVE_URL within 120 s ($name; see its log)"
  log "the service answers at $CT_SERVE_URL"
}

# What every container of the serving image runs with, the service and the pipeline's own
# measurement alike: not root, a read-only root file system, no capabilities, no privilege gain,
# a process and a memory limit, an init that passes signals on.
SERVING_LOCKDOWN=(--init --user 1000:1000 --read-only --tmpfs /tmp --cap-drop ALL
  --security-opt no-new-privileges --pids-limit 256 --memory "$CT_SERVE_MEMORY"
  --memory-swap "$CT_SERVE_MEMORY")

# start_service_container NAME IMAGE: the service's container, locked down (SERVING_LOCKDOWN), with
# models/ and serving/ read-only and nothing else of the workspace; --network host, on loopback.
start_service_container() {
  docker run -d --name "$1" --label ct.role=serve --label "ct.workspace=$CT_WORKSPACE" \
    --restart unless-stopped --network host "${SERVING_LOCKDOWN[@]}" -e "CT_SERVE_PORT=$CT_SERVE_PORT" \
    -v "$CT_WORKSPACE/$SERVE_MODELS_DIR:/workspace/$SERVE_MODELS_DIR:ro" \
    -v "$CT_WORKSPACE/$SERVE_SERVING_DIR:/workspace/$SERVE_SERVING_DIR:ro" \
    --entrypoint python "$2" -m ct.serving --workspace /workspace --host 127.0.0.1 \
    --port "$CT_SERVE_PORT" >/dev/null || die "docker run of the service ($2) failed"
  log "service started: container $1 ($2) on port $CT_SERVE_PORT"
}

# start_service_process: python -m ct.serving of this checkout in the background, in a session of
# its own (no signal to job7's process group reaches it), its pid in serving/service.pid. Jenkins
# kills what a build leaves running when it carries the build's BUILD_ID (core's
# ProcessTree.killAll, see tests/test_job7.py): the service carries another.
start_service_process() {
  local ws logf
  ws="$(cd "$CT_WORKSPACE" && pwd -P)"
  logf="$ws/$SERVE_SERVICE_LOG"
  if [[ -f "$logf" ]]; then mv -f "$logf" "$logf.prev"; fi
  (cd "$ws" && BUILD_ID=dontKillMe JENKINS_NODE_COOKIE=dontKillMe PYTHONPATH="$CT_ROOT" \
    PYTHONDONTWRITEBYTECODE=1 exec setsid "$CT_PYTHON" -m ct.serving --workspace "$ws" \
    --host 127.0.0.1 --port "$CT_SERVE_PORT") </dev/null >"$logf" 2>&1 &
  write_file "$ws/$SERVE_PID_FILE" "$!"
  log "service started: pid $!, python -m ct.serving on port $CT_SERVE_PORT, log $logf"
}

# stop_service: stop this workspace's service (its model stays recorded in serving/).
stop_service() {
  local pid
  resolve_runtime
  serve_names
  if [[ "$CT_RUNTIME" == docker ]]; then
    docker rm -f "$(container_name serve)" >/dev/null 2>&1 || log "no service container to stop"
  elif pid="$(ct_deploy local-pid)"; then
    kill "$pid"
    log "service stopped (pid $pid)"
  else
    log "no service of this workspace runs"
  fi
}
