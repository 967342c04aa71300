#!/usr/bin/env bash
# Shared code of the job scripts (scripts/job*.sh, scripts/pipeline.sh). Sourced, never run.
#
# Every setting is read from the environment; its default is written here, once, and listed in the
# README ("Settings"). Jenkins sets them as global environment variables / credentials; `make run`
# and the tests set them in the environment of the scripts.

# ----------------------------------------------------------------------------------- settings
CT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"   # the checkout holding these scripts

: "${CT_WORKSPACE:=$CT_ROOT/workspace}"   # the pipeline's one workspace (code + state)
: "${CT_RUNTIME:=}"                       # docker | local; empty: docker when an engine answers
: "${CT_THRESHOLD:=80}"                   # accuracy gate, percent
: "${CT_REPO_URL:=${GIT_URL:-$CT_ROOT}}"  # git repository (path or URL) job1 pulls from; under
                                          # Jenkins the git plugin's GIT_URL (job1's literal URL)
: "${CT_GIT_REF:=${GIT_COMMIT:-HEAD}}"    # what job1 checks out (Jenkins' GIT_COMMIT when set)
: "${CT_DATA_DIR:=}"                      # dataset to seed $CT_WORKSPACE/data from (folder with
                                          # cifar-10-batches-py/ or cifar-10-python.tar.gz)
: "${CT_TRAIN_ARGS:=}"                    # extra train.py flags for job3 (e.g. --epochs 30)
: "${CT_TUNE_TRIALS:=8}"                  # tuning: number of trials (job5)
: "${CT_TUNE_BUDGET:=3600}"               # tuning: time budget in seconds (job5)
: "${CT_TUNE_ARGS:=}"                     # extra train.py --tune flags for job5
: "${CT_MAX_TUNE_ROUNDS:=1}"              # tuning rounds per commit
: "${CT_MAX_RESTARTS:=3}"                 # job6: restarts of one failed container
: "${CT_BASE_IMAGE:=}"                    # BASE_IMAGE build arg; empty: the Dockerfiles' default
: "${CT_IMAGE_PREFIX:=ct-cifar}"          # images are <prefix>-train:<hash>, <prefix>-tune:<hash>
: "${CT_GPUS:=}"                          # docker run --gpus value (e.g. all); empty: no GPU
: "${CT_MEMORY:=}"                        # docker run --memory limit (e.g. 8g); empty: none
: "${CT_CONTAINER_USER:=}"                # uid:gid in the container; empty: yours, or 1000:1000 as root
: "${CT_PYTHON:=python3}"                 # the interpreter of the local runtime (and of ct.*)
: "${SMTP_HOST:=}"                        # empty: mails are kept in $CT_WORKSPACE/outbox/
: "${SMTP_PORT:=25}"
: "${SMTP_STARTTLS:=false}"                # true: STARTTLS before login (true/false, as Jenkins reads it)
: "${SMTP_USER:=}"
: "${SMTP_PASSWORD:=}"
: "${NOTIFY_FROM:=ct-pipeline@localhost}"
: "${NOTIFY_TO:=}"
: "${JENKINS_URL:=http://localhost:8080}"
: "${JENKINS_USER:=}"
: "${JENKINS_API_TOKEN:=}"
: "${CT_TRIGGER_TOKEN:=}"                 # job2's "trigger builds remotely" token (weekly retrain)
: "${CT_RETRAIN_JOB:=job2}"               # the Jenkins job the weekly retrain starts
: "${DOCKER_BUILDKIT:=0}"                 # the classic builder: no BuildKit needed on the host
export CT_WORKSPACE CT_RUNTIME CT_THRESHOLD CT_REPO_URL CT_GIT_REF CT_DATA_DIR CT_TRAIN_ARGS \
  CT_TUNE_TRIALS CT_TUNE_BUDGET CT_TUNE_ARGS CT_MAX_TUNE_ROUNDS CT_MAX_RESTARTS CT_BASE_IMAGE \
  CT_IMAGE_PREFIX CT_GPUS CT_MEMORY CT_CONTAINER_USER CT_PYTHON SMTP_HOST SMTP_PORT SMTP_STARTTLS \
  SMTP_USER SMTP_PASSWORD NOTIFY_FROM NOTIFY_TO JENKINS_URL JENKINS_USER JENKINS_API_TOKEN \
  CT_TRIGGER_TOKEN CT_RETRAIN_JOB DOCKER_BUILDKIT

# Pipeline state that lives in the workspace beside the code; job1 never touches it.
# shellcheck disable=SC2034 # used by job1-pull.sh
CT_STATE_PATHS=(data/ runs/ outbox/ status/ plot/ artifacts/ accuracy.txt metrics.json best.json
  best-model.pt models/ commit.txt gate.properties promotion.properties accuracy-history.csv
  handover.properties)

# job6 -> job4: a run that job6 restarted and that has now finished (COMMIT, RUN_DIR), for the
# parameterized trigger on job6 (jenkins/jobs.yaml); written by job6 only, removed by its next build.
# shellcheck disable=SC2034 # used by job6-monitor.sh
CT_HANDOVER_FILE=handover.properties

# ----------------------------------------------------------------------------------- logging
CT_JOB="${CT_JOB:-$(basename "$0" .sh)}"

log() { printf '[%s %s] %s\n' "$(date +%H:%M:%S)" "$CT_JOB" "$*" >&2; }

# die MESSAGE [EXIT_CODE]: one clear line on stderr, then exit (1 by default, 2 for bad input).
die() {
  log "error: $1"
  exit "${2:-1}"
}

# ----------------------------------------------------------------------------------- artifacts
# CT_ARTIFACTS_DIR (set by every job's step in jenkins/jobs.yaml) holds what this build keeps; the
# job archives it and job4 plots from it. It starts empty in every build, so a build that fails
# early never archives or plots an earlier build's files. Emptied once per build: a script that
# runs another (job4 -> job2-image.sh) passes the marker on.
if [[ -n "${CT_ARTIFACTS_DIR:-}" && "${CT_ARTIFACTS_EMPTIED:-}" != "$CT_ARTIFACTS_DIR" ]]; then
  mkdir -p "$CT_ARTIFACTS_DIR"
  find "$CT_ARTIFACTS_DIR" -mindepth 1 -delete
  export CT_ARTIFACTS_EMPTIED="$CT_ARTIFACTS_DIR"
fi

keep_artifact() { # FILE...: copy into this build's CT_ARTIFACTS_DIR (nothing outside Jenkins)
  [[ -n "${CT_ARTIFACTS_DIR:-}" ]] || return 0
  mkdir -p "$CT_ARTIFACTS_DIR"
  cp -f "$@" "$CT_ARTIFACTS_DIR/"
}

# ----------------------------------------------------------------------------------- checks
require_uint() { # NAME VALUE
  [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a whole number, not '$2'" 2
}

require_workspace_code() {
  [[ -f "$CT_WORKSPACE/train.py" ]] ||
    die "no train.py in CT_WORKSPACE=$CT_WORKSPACE: run job1 (scripts/job1-pull.sh) first" 2
}

workspace_id() { # short, stable id of the workspace path: names its containers
  printf '%s' "$(cd "$CT_WORKSPACE" && pwd -P)" | sha256sum | cut -c1-12
}

container_name() { printf 'ct-%s-%s' "$1" "$(workspace_id)"; } # ROLE

current_commit() {
  local file="$CT_WORKSPACE/commit.txt"
  if [[ -s "$file" ]]; then tr -d '[:space:]' <"$file"; else printf 'unknown'; fi
}

# ----------------------------------------------------------------------------------- runtime
docker_answers() {
  command -v docker >/dev/null 2>&1 &&
    timeout 15 docker version --format '{{.Server.Version}}' >/dev/null 2>&1
}

# Settle CT_RUNTIME once (exported, so child jobs of pipeline.sh do not probe again).
resolve_runtime() {
  case "$CT_RUNTIME" in
    docker)
      docker_answers ||
        die "CT_RUNTIME=docker but no Docker engine answers (DOCKER_HOST=${DOCKER_HOST:-default socket})"
      ;;
    local) ;;
    "")
      if docker_answers; then
        CT_RUNTIME=docker
      else
        CT_RUNTIME=local
        log "no Docker engine answers (DOCKER_HOST=${DOCKER_HOST:-default socket}): using the local runtime (python on this host)"
      fi
      ;;
    *) die "CT_RUNTIME must be docker or local, not '$CT_RUNTIME'" 2 ;;
  esac
  export CT_RUNTIME
}

# ----------------------------------------------------------------------------------- small files
# Atomic writes: temp file in the same folder, then rename.
write_file() { # PATH TEXT
  local tmp
  mkdir -p "$(dirname "$1")"
  tmp="$(mktemp "$1.XXXXXX.tmp")"
  printf '%s\n' "$2" >"$tmp"
  mv -f "$tmp" "$1"
}

# props_get FILE KEY: the value of KEY=... in a Java-style properties file (empty when absent).
props_get() {
  [[ -f "$1" ]] || return 0
  sed -n "s/^$2=//p" "$1" | tail -n 1
}

# props_set FILE KEY VALUE [KEY VALUE ...]: replace or add keys, atomically.
props_set() {
  local file="$1" text="" key
  shift
  [[ -f "$file" ]] && text="$(cat "$file")"
  while (($# >= 2)); do
    key="$1"
    text="$(printf '%s\n' "$text" | grep -v "^$key=" || true)"
    text="$(printf '%s\n%s=%s' "$text" "$key" "$2" | sed '/^$/d')"
    shift 2
  done
  write_file "$file" "$text"
}

# The record of a training/tuning process: $CT_WORKSPACE/status/<role>.properties.
state_file() { printf '%s/status/%s.properties' "$CT_WORKSPACE" "$1"; }

# Call a ct.* helper (ct.gate, ct.notify) with the pipeline's code on the path.
ct_py() { PYTHONPATH="$CT_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$CT_PYTHON" -m "$@"; }

# ----------------------------------------------------------------------------------- data
has_cifar() { [[ -d "$1/cifar-10-batches-py" || -f "$1/cifar-10-python.tar.gz" ]]; }

# Seed $CT_WORKSPACE/data from CT_DATA_DIR once (hard links when possible: no copy of the bytes).
# With no dataset anywhere, DATA_FLAGS=(--download): train.py fetches it (official checksum).
# shellcheck disable=SC2034 # used by job3-train.sh and job5-tune.sh
DATA_FLAGS=()
ensure_data() {
  local dst="$CT_WORKSPACE/data" src="$CT_DATA_DIR" item
  mkdir -p "$dst"
  has_cifar "$dst" && return 0
  if [[ -z "$src" ]]; then
    log "no dataset in $dst and CT_DATA_DIR is empty: train.py downloads CIFAR-10 (--download)"
    # shellcheck disable=SC2034
    DATA_FLAGS=(--download)
    return 0
  fi
  has_cifar "$src" ||
    die "CT_DATA_DIR=$src holds neither cifar-10-batches-py/ nor cifar-10-python.tar.gz" 2
  if [[ -d "$src/cifar-10-batches-py" ]]; then item=cifar-10-batches-py; else item=cifar-10-python.tar.gz; fi
  cp -al "$src/$item" "$dst/" 2>/dev/null || cp -a "$src/$item" "$dst/"
  log "dataset seeded: $dst/$item (from $src)"
}

# ----------------------------------------------------------------------------------- images
# detect_framework: print pytorch|tensorflow|sklearn from the workspace's network.py/train.py.
detect_framework() {
  local files=() f
  for f in network.py train.py; do [[ -f "$CT_WORKSPACE/$f" ]] && files+=("$CT_WORKSPACE/$f"); done
  ((${#files[@]})) || die "no network.py or train.py in $CT_WORKSPACE to inspect" 2
  if grep -Eq '^\s*(import torch|from torch[ .])|torch\.nn|nn\.Conv2d' "${files[@]}"; then
    echo pytorch
  elif grep -Eq '^\s*(import|from) (tensorflow|keras)|tf\.keras|keras\.layers' "${files[@]}"; then
    echo tensorflow
  elif grep -Eq '^\s*(import|from) sklearn|sklearn\.' "${files[@]}"; then
    echo sklearn
  else
    die "unknown framework in network.py/train.py: looked for PyTorch (import torch, torch.nn, nn.Conv2d), Keras/TensorFlow (import tensorflow, keras, tf.keras) and scikit-learn (import sklearn)" 2
  fi
}

# dockerfile_for FRAMEWORK ROLE: the Dockerfile (relative to the workspace) for that framework.
dockerfile_for() {
  local name
  if [[ "$1" == pytorch ]]; then name="Dockerfile.$2"; else name="Dockerfile.$1.$2"; fi
  [[ -f "$CT_WORKSPACE/$name" ]] ||
    die "framework $1 detected, but the commit has no $name to build its $2 image (PyTorch uses Dockerfile.train / Dockerfile.tune)" 2
  printf '%s' "$name"
}

# image_tag ROLE DOCKERFILE: tag by the content of what goes into the image.
image_tag() {
  local hash
  hash="$(cd "$CT_WORKSPACE" && {
    printf 'base=%s\n' "$CT_BASE_IMAGE"
    for f in "$2" requirements.txt .dockerignore; do
      printf '%s\n' "$f"
      if [[ -f "$f" ]]; then cat "$f"; fi
    done
  } | sha256sum | cut -c1-16)"
  printf '%s-%s:%s' "$CT_IMAGE_PREFIX" "$1" "$hash"
}

# ensure_image ROLE: print the image for ROLE (train|tune), building it only when that tag is new.
# Records FRAMEWORK and <ROLE>_IMAGE in status/image.properties.
ensure_image() {
  local role="$1" framework dockerfile tag build=()
  framework="$(detect_framework)"
  dockerfile="$(dockerfile_for "$framework" "$role")"
  tag="$(image_tag "$role" "$dockerfile")"
  if docker image inspect "$tag" >/dev/null 2>&1; then
    log "framework $framework: image $tag exists (same $dockerfile + requirements): not rebuilding"
  else
    log "framework $framework: building $tag from $dockerfile"
    [[ -n "$CT_BASE_IMAGE" ]] && build+=(--build-arg "BASE_IMAGE=$CT_BASE_IMAGE")
    docker build "${build[@]}" --label "ct.role=$role" --label "ct.framework=$framework" \
      -f "$CT_WORKSPACE/$dockerfile" -t "$tag" "$CT_WORKSPACE" >&2 ||
      die "docker build of $dockerfile failed"
  fi
  props_set "$CT_WORKSPACE/status/image.properties" FRAMEWORK "$framework" \
    "${role^^}_IMAGE" "$tag" "${role^^}_DOCKERFILE" "$dockerfile"
  printf '%s' "$tag"
}

# ----------------------------------------------------------------------------------- processes
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
    local run=(docker run -d --init --name "$name" --label "ct.role=$role" --label "ct.workspace=$CT_WORKSPACE"
      --label "ct.commit=$commit" --user "$user" -e HOME=/tmp -e "CT_COMMIT=$commit"
      --shm-size 1g -v "$CT_WORKSPACE:/workspace" -w /workspace)
    [[ -n "$CT_GPUS" ]] && run+=(--gpus "$CT_GPUS")
    # the limit is the limit: no extra swap, so an OOM kill is prompt and the same every time
    [[ -n "$CT_MEMORY" ]] && run+=(--memory "$CT_MEMORY" --memory-swap "$CT_MEMORY")
    "${run[@]}" "$image" "$@" >/dev/null || die "docker run of $image failed"
    LAUNCHED="$name"
  else
    local logf="$CT_WORKSPACE/status/$role.log"
    if [[ -f "$logf" ]]; then mv -f "$logf" "$logf.prev"; fi
    (cd "$CT_WORKSPACE" && CT_COMMIT="$commit" exec "$CT_PYTHON" train.py "$@") >"$logf" 2>&1 &
    LAUNCHED="pid-$!"
  fi
}

# start_process ROLE IMAGE ARGS...: launch, and record it in status/<role>.properties (RESTARTS=0).
start_process() {
  local role="$1" image="$2"
  shift 2
  launch "$role" "$image" "$@"
  write_file "$(state_file "$role")" "ROLE=$role
RUNTIME=$CT_RUNTIME
CONTAINER=$LAUNCHED
IMAGE=$image
COMMIT=$(current_commit)
ARGS=$(printf '%q ' "$@")
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

# ----------------------------------------------------------------------------------- after a run
# latest_run_field KEY: a field of the workspace's metrics.json (the latest finished run), or ''
# when it cannot be read (ct.gate check then says what is wrong with it).
latest_run_field() {
  "$CT_PYTHON" - "$CT_WORKSPACE/metrics.json" "$1" 2>/dev/null <<'PY' || true
import json, sys
try:
    value = json.load(open(sys.argv[1], encoding="utf-8")).get(sys.argv[2])
except (OSError, ValueError, AttributeError):
    value = None
print(value if isinstance(value, str) else "")
PY
}

# after_run mail|outbox-only: what follows every finished training or tuning run, whoever started
# it: job4 (after job3, or after job6 restarted the run), job5, job6 --follow. ct.gate check judges
# the workspace's latest run against CT_THRESHOLD (gate.properties, history, plot); a tuning run,
# or a training run at or above the threshold, is promoted when it beats the best model and
# mailed (ct.notify; outbox-only keeps the message in outbox/ when Jenkins' email-ext sends job5's
# mail); a training run below
# the threshold gets the tuning image ready and gate.properties PASSED=false hands it to job5.
# Exactly once per run: status/after-run.properties names the last run handled; a second call for
# the same run changes nothing (job4 built twice, or a restarted run handed over by job6).
after_run() {
  local W="$CT_WORKSPACE" delivery="$1" record run_id passed event notify=()
  [[ "$delivery" == outbox-only ]] && notify=(--outbox-only)
  record="$W/status/after-run.properties"
  run_id="$(latest_run_field run_id)"
  if [[ -n "$run_id" && "$(props_get "$record" RUN_ID)" == "$run_id" ]]; then
    log "run $run_id was judged already ($(props_get "$record" VERDICT)): nothing to do"
    return 0
  fi
  ct_py ct.gate check --workspace "$W" --threshold "$CT_THRESHOLD" ||
    die "the accuracy gate could not judge this run (see the line above); nothing promoted" 2
  keep_artifact "$W/gate.properties" "$W/plot/accuracy.csv"
  passed="$(props_get "$W/gate.properties" PASSED)"
  if [[ "$run_id" == tune-* || "$passed" == true ]]; then
    ct_py ct.gate promote --workspace "$W" || die "promotion failed (see the line above)" 2
    event=best-model
    [[ "$run_id" == tune-* ]] && event=tuned
    if [[ "$event" == tuned || "$(props_get "$W/promotion.properties" PROMOTED)" == true ]]; then
      ct_py ct.notify --workspace "$W" --event "$event" "${notify[@]}" ||
        die "the notification could not be sent (kept in $W/outbox/)"
    else
      log "the current best model stays (it is at least as good): no mail"
    fi
  else
    log "below the threshold of $CT_THRESHOLD%: preparing the tuning image for job5"
    prepare_tuning_image
    log "handing over to job5 (gate.properties PASSED=false)"
  fi
  props_set "$record" RUN_ID "$run_id" VERDICT "passed=$passed" JUDGED_AT "$(date -u +%FT%TZ)"
}

prepare_tuning_image() {
  require_workspace_code
  resolve_runtime
  if [[ "$CT_RUNTIME" == docker ]]; then
    ensure_image tune >/dev/null
  else
    "$CT_ROOT/scripts/job2-image.sh" tune >/dev/null
  fi
}
