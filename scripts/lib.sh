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
: "${CT_TUNE_TRIALS:=}"                   # tuning: number of trials (job5); empty: train.py's
: "${CT_TUNE_BUDGET:=}"                   # tuning: time budget in seconds (job5); empty:
                                          # train.py's, and no hard deadline on top of it
: "${CT_TUNE_ARGS:=}"                     # extra train.py --tune flags for job5
: "${CT_TUNE_WORKERS:=1}"                 # job5: tuning processes/containers sharing one round
: "${CT_TUNE_STORAGE:=}"                  # the study's database URL (secret: a Jenkins credential);
                                          # empty: the journal file in the workspace (studies/)
: "${CT_MAX_TUNE_ROUNDS:=1}"              # tuning rounds per commit
: "${CT_MAX_RESTARTS:=3}"                 # job6: restarts of one failed container
: "${CT_BASE_IMAGE:=}"                    # BASE_IMAGE build arg; empty: the Dockerfiles' default
: "${CT_IMAGE_PREFIX:=ct-cifar}"          # images are <prefix>-train:<hash>, <prefix>-tune:<hash>
: "${CT_GPUS:=}"                          # docker run --gpus value (e.g. all); empty: no GPU
: "${CT_MEMORY:=}"                        # docker run --memory limit (e.g. 8g); empty: none
: "${CT_CONTAINER_USER:=}"                # uid:gid in the container; empty: yours, or 1000:1000 as root
: "${CT_PYTHON:=python3}"                 # the interpreter of the local runtime (and of ct.*)
: "${SMTP_HOST:=}"                        # empty: mails are kept in $CT_WORKSPACE/outbox/
: "${SMTP_PORT:=}"                        # empty: ct.pipeline.notify's default (25; 465 for TLS)
: "${SMTP_STARTTLS:=false}"                # true: STARTTLS before login (true/false, as Jenkins reads it)
: "${SMTP_USER:=}"
: "${SMTP_PASSWORD:=}"
: "${NOTIFY_FROM:=}"                      # empty: ct.pipeline.notify's default sender
: "${NOTIFY_TO:=}"
: "${JENKINS_URL:=http://localhost:8080}"
: "${JENKINS_USER:=}"
: "${JENKINS_API_TOKEN:=}"
: "${CT_TRIGGER_TOKEN:=}"                 # job2's "trigger builds remotely" token (weekly retrain)
: "${CT_RETRAIN_JOB:=job2}"               # the Jenkins job the weekly retrain starts
: "${DOCKER_BUILDKIT:=0}"                 # the classic builder: no BuildKit needed on the host
export CT_WORKSPACE CT_RUNTIME CT_THRESHOLD CT_REPO_URL CT_GIT_REF CT_DATA_DIR CT_TRAIN_ARGS \
  CT_TUNE_TRIALS CT_TUNE_BUDGET CT_TUNE_ARGS CT_TUNE_WORKERS CT_TUNE_STORAGE CT_MAX_TUNE_ROUNDS CT_MAX_RESTARTS CT_BASE_IMAGE \
  CT_IMAGE_PREFIX CT_GPUS CT_MEMORY CT_CONTAINER_USER CT_PYTHON SMTP_HOST SMTP_PORT SMTP_STARTTLS \
  SMTP_USER SMTP_PASSWORD NOTIFY_FROM NOTIFY_TO JENKINS_URL JENKINS_USER JENKINS_API_TOKEN \
  CT_TRIGGER_TOKEN CT_RETRAIN_JOB DOCKER_BUILDKIT

# Pipeline state that lives in the workspace beside the code; job1 never touches it.
# shellcheck disable=SC2034 # used by job1-pull.sh
CT_STATE_PATHS=(data/ runs/ outbox/ status/ plot/ artifacts/ accuracy.txt metrics.json best.json
  best-model.pt models/ commit.txt gate.properties promotion.properties accuracy-history.csv
  handover.properties report/ studies/)

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

# Call a host-side helper (ct.pipeline.gate, ct.pipeline.notify) with the pipeline's code on the path.
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
    for f in "$2" requirements.txt requirements-tune.txt .dockerignore; do
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

# ----------------------------------------------------------------------------------- after a run
# latest_run_field KEY: a field of the workspace's metrics.json (the latest finished run), or ''
# when it cannot be read (ct.pipeline.gate check then says what is wrong with it).
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
# it: job4 (after job3, or after job6 restarted the run), job5, job6 --follow. The gate (ct.pipeline.gate check) judges
# the workspace's latest run against CT_THRESHOLD (gate.properties, history, plot); a tuning run,
# or a training run at or above the threshold, is promoted when it beats the best model and
# mailed (ct.pipeline.notify; outbox-only keeps the message in outbox/ when Jenkins' email-ext sends job5's
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
  ct_py ct.pipeline.gate check --workspace "$W" --threshold "$CT_THRESHOLD" ||
    die "the accuracy gate could not judge this run (see the line above); nothing promoted" 2
  keep_artifact "$W/gate.properties" "$W/plot/accuracy.csv"
  passed="$(props_get "$W/gate.properties" PASSED)"
  if [[ "$run_id" == tune-* || "$passed" == true ]]; then
    ct_py ct.pipeline.gate promote --workspace "$W" || die "promotion failed (see the line above)" 2
    event=best-model
    [[ "$run_id" == tune-* ]] && event=tuned
    if [[ "$event" == tuned || "$(props_get "$W/promotion.properties" PROMOTED)" == true ]]; then
      ct_py ct.pipeline.notify --workspace "$W" --event "$event" "${notify[@]}" ||
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
  write_report
}

# write_report: the pipeline's report page (W/report/index.html, Jenkins' "CT report" link), and
# the judged run's curves for this build's mail (email-ext attaches artifacts/<job>/curves.png).
# A report that cannot be written is said, not fatal: the verdict above is what the build is for.
write_report() {
  local run_dir
  run_dir="$(latest_run_field run_dir)"
  if [[ -n "$run_dir" && -f "$CT_WORKSPACE/$run_dir/curves.png" ]]; then
    keep_artifact "$CT_WORKSPACE/$run_dir/curves.png"
  fi
  ct_py ct.pipeline.report --workspace "$CT_WORKSPACE" ||
    log "warning: the report could not be written (see the line above); the verdict stands"
}

prepare_tuning_image() {
  require_workspace_code
  resolve_runtime
  select_image tune >/dev/null
}

# select_image ROLE: job2's choice for ROLE (train|tune), printed and recorded in
# status/image.properties: on docker the image of the detected framework, built when its tag is new;
# on the local runtime "local", after checking that this host's python can run the code.
select_image() {
  local role="$1" framework
  if [[ "$CT_RUNTIME" == docker ]]; then
    ensure_image "$role"
    return
  fi
  framework="$(detect_framework)"
  [[ "$framework" == pytorch ]] ||
    die "the local runtime runs PyTorch code only; detected $framework" 2
  "$CT_PYTHON" -c 'import torch' 2>/dev/null ||
    die "local runtime: $CT_PYTHON cannot import torch (pip install -r requirements.txt)" 2
  props_set "$CT_WORKSPACE/status/image.properties" FRAMEWORK "$framework" "${role^^}_IMAGE" local
  log "framework $framework: local runtime, no image ($CT_PYTHON)"
  printf 'local'
}

# image_for ROLE: the image job2 (or job4, for tuning) selected, selecting it again when it is
# missing (never selected, or removed from the engine since).
image_for() {
  local image
  image="$(props_get "$CT_WORKSPACE/status/image.properties" "${1^^}_IMAGE")"
  if [[ "$CT_RUNTIME" == local ]]; then
    printf 'local'
  elif [[ -n "$image" && "$image" != local ]] && docker image inspect "$image" >/dev/null 2>&1; then
    printf '%s' "$image"
  else
    ensure_image "$1"
  fi
}

# ----------------------------------------------------------------------------------- processes
# shellcheck source=scripts/lib-process.sh
source "$CT_ROOT/scripts/lib-process.sh"
