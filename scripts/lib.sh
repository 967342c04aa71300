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
: "${CT_INCREMENTS_DIR:=}"                # labelled images added to the data (docs/data.md);
                                          # empty: $CT_WORKSPACE/data/increments
: "${CT_DATA_DIR:=}"                      # dataset to seed $CT_WORKSPACE/data from (folder with
                                          # cifar-10-batches-py/ or cifar-10-python.tar.gz)
: "${CT_TRAIN_ARGS:=}"                    # extra train.py flags for job3 (e.g. --epochs 30)
: "${CT_TUNE_TRIALS:=}"                   # tuning: number of trials (job5); empty: train.py's
: "${CT_TUNE_BUDGET:=}"                   # tuning: time budget in seconds (job5); empty:
                                          # train.py's, and no hard deadline on top of it
: "${CT_TUNE_ARGS:=}"                     # extra train.py --tune flags for job5
: "${CT_TUNE_WORKERS:=1}"                 # job5: tuning processes/containers sharing one round
: "${CT_TRAININGS_PER_HOST:=1}"           # trainings (or tuning rounds) this host runs at once:
                                          # each gets its share of the cores (ct.cpu_budget)
: "${CT_TUNE_STORAGE:=}"                  # the study's database URL (secret: a Jenkins credential);
                                          # empty: the journal file in the workspace (studies/)
: "${CT_MAX_TUNE_ROUNDS:=1}"              # tuning rounds per commit
: "${CT_MAX_RESTARTS:=3}"                 # job6: restarts of one failed container
: "${CT_PUSH_ORDER:=}"                    # all | newest; empty: ct.pipeline.push_queue's (all)
: "${CT_PUSH_QUEUE_MAX:=}"                # pushes that may wait; empty: ct.pipeline.push_queue's (20)
: "${CT_KEEP_SNAPSHOTS:=}"                # unreferenced code snapshots kept; empty:
                                          # ct.pipeline.snapshots' (5)
: "${CT_MAX_CLASS_DROP:=}"                # promotion refuses a better model that lost more than
                                          # this many points on a class; empty: no such guard
: "${CT_MEASURE:=}"                       # 1: the pipeline measures a candidate before promotion;
                                          # 0: its own claim promotes; empty: ct.pipeline.measured's (1)
: "${CT_MEASURE_TOLERANCE:=}"             # points allowed between claimed and measured; empty:
                                          # ct.pipeline.measured's (0.5)
: "${CT_BASE_IMAGE:=}"                    # BASE_IMAGE build arg; empty: the Dockerfiles' default
: "${CT_IMAGE_PREFIX:=ct-cifar}"          # images are <prefix>-train:<hash>, <prefix>-tune:<hash>
: "${CT_GPUS:=}"                          # docker run --gpus value (e.g. all); empty: no GPU
: "${CT_MEMORY:=}"                        # docker run --memory limit (e.g. 8g); empty: none
: "${CT_CONTAINER_USER:=}"                # uid:gid in the container; empty: yours, or 1000:1000 as root
: "${CT_ALLOW_ROOT_CONTAINER:=}"          # 1: a container user of uid or gid 0 is allowed (never by default)
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
: "${CT_RETRAIN_JOB:=job2}"               # the Jenkins job the weekly retrain starts
: "${DOCKER_BUILDKIT:=0}"                 # the classic builder: no BuildKit needed on the host
: "${CT_DEPLOY:=1}"                       # 0: the local chain (make run) does not deploy (job7)
: "${CT_SERVE_PORT:=8500}"                # the model service's port on this host (job7 starts it)
: "${CT_SERVE_URL:=http://127.0.0.1:$CT_SERVE_PORT}" # the service job7 deploys to
: "${CT_SERVE_IMAGE:=$CT_IMAGE_PREFIX-serve}" # the serving image's name; tag: its content's hash
: "${CT_SERVE_BASE_IMAGE:=}"              # Dockerfile.serve's BASE_IMAGE; empty: its default
: "${CT_SERVE_MEMORY:=2g}"                # docker run --memory of the service's container
export CT_DEPLOY CT_SERVE_PORT CT_SERVE_URL CT_SERVE_IMAGE CT_SERVE_BASE_IMAGE CT_SERVE_MEMORY
export CT_WORKSPACE CT_RUNTIME CT_THRESHOLD CT_REPO_URL CT_GIT_REF CT_DATA_DIR CT_INCREMENTS_DIR CT_TRAIN_ARGS \
  CT_TUNE_TRIALS CT_TUNE_BUDGET CT_TUNE_ARGS CT_TUNE_WORKERS CT_TUNE_STORAGE CT_MAX_TUNE_ROUNDS CT_MAX_RESTARTS \
  CT_TRAININGS_PER_HOST CT_BASE_IMAGE CT_PUSH_ORDER CT_PUSH_QUEUE_MAX CT_KEEP_SNAPSHOTS CT_MAX_CLASS_DROP \
  CT_MEASURE CT_MEASURE_TOLERANCE \
  CT_IMAGE_PREFIX CT_GPUS CT_MEMORY CT_CONTAINER_USER CT_ALLOW_ROOT_CONTAINER CT_PYTHON SMTP_HOST SMTP_PORT SMTP_STARTTLS \
  SMTP_USER SMTP_PASSWORD NOTIFY_FROM NOTIFY_TO JENKINS_URL JENKINS_USER JENKINS_API_TOKEN \
  CT_RETRAIN_JOB DOCKER_BUILDKIT

# ----------------------------------------------------------------------------------- logging
CT_JOB="${CT_JOB:-$(basename "$0" .sh)}"
export CT_JOB # the host-side Python logs its decisions under the same name

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

# keep_artifact FILE...: copy into this build's CT_ARTIFACTS_DIR (nothing outside Jenkins). The
# files are the workspace's, which a container can write: only regular files inside it are copied,
# never what a symlink points to (cp -P copies a link that appeared since the check as a link,
# which is then refused too).
keep_artifact() {
  local file ws kept
  [[ -n "${CT_ARTIFACTS_DIR:-}" ]] || return 0
  mkdir -p "$CT_ARTIFACTS_DIR"
  ws="$(cd "$CT_WORKSPACE" && pwd -P)"
  for file in "$@"; do
    [[ -f "$file" && ! -L "$file" && "$(cd "$(dirname "$file")" && pwd -P)/" == "$ws/"* ]] ||
      die "$file is not a regular file inside the workspace $ws (a symlink?): not archived; remove it, then rerun" 2
    kept="$CT_ARTIFACTS_DIR/$(basename "$file")"
    cp -P --remove-destination "$file" "$kept"
    if [[ -L "$kept" ]]; then
      rm -f "$kept"
      die "$file became a symlink while it was copied: not archived; remove it, then rerun" 2
    fi
  done
}

# ----------------------------------------------------------------------------------- checks
require_increments_dir() { # docker mounts it: an absolute path
  [[ -z "$CT_INCREMENTS_DIR" || "$CT_INCREMENTS_DIR" == /* ]] ||
    die "CT_INCREMENTS_DIR must be an absolute path, not '$CT_INCREMENTS_DIR'" 2
}

require_uint() { # NAME VALUE
  # decimal without a leading zero (bash would read 08 as octal), at most 9 digits
  [[ "$2" =~ ^(0|[1-9][0-9]{0,8})$ ]] || die "$1 must be a whole number, not '$2'" 2
}


workspace_id() { # short, stable id of the workspace path: names its containers
  printf '%s' "$(cd "$CT_WORKSPACE" && pwd -P)" | sha256sum | cut -c1-12
}

container_name() { printf 'ct-%s-%s' "$1" "$(workspace_id)"; } # ROLE

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

# ----------------------------------------------------------------------------------- python
# Call a host-side tool (ct.workspace, ct.pipeline.*) with the pipeline's code on the path. The
# decisions and every record of the workspace are theirs; these scripts never parse a record.
ct_py() { PYTHONPATH="$CT_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$CT_PYTHON" -m "$@"; }

# record_get RECORD KEY, record_set RECORD KEY VALUE...: image, gate and promotion records.
record_get() { ct_py ct.pipeline.records --workspace "$CT_WORKSPACE" get "$@"; }
record_set() { ct_py ct.pipeline.records --workspace "$CT_WORKSPACE" set "$@"; }

# The workspace's names from their one owner (ct/workspace.py), once per script: WS_COMMIT_FILE,
# WS_DATA_DIR, WS_CODE_DIR, ...
ws_names="$(ct_py ct.workspace names)" ||
  die "$CT_PYTHON cannot run ct.workspace from $CT_ROOT (set CT_PYTHON to a Python 3.10+)" 2
while IFS='=' read -r ws_key ws_value; do printf -v "WS_$ws_key" '%s' "$ws_value"; done <<<"$ws_names"
unset ws_names ws_key ws_value

# ----------------------------------------------------------------------------------- code
# Each commit's code is a read-only snapshot, code/<commit>/, taken from the git repository job1
# fetches pushes into (code/repo.git). Runs train their snapshot, so a later push never changes
# the code under a running or resumable run. Host git there runs no hook and no fsmonitor (a
# planted one would run on this host), fetches only by the transports job1 accepts
# (ct.pipeline.push_source) and checks every object it receives (no ".git" or ".." in a tree).
repo_git() {
  git -c core.hooksPath=/dev/null -c core.fsmonitor=false -c protocol.allow=never \
    -c protocol.file.allow=always -c protocol.https.allow=always -c protocol.ssh.allow=always \
    -c transfer.fsckObjects=true --git-dir "$CT_WORKSPACE/$WS_CODE_REPO" "$@"
}

snapshot_path() { printf '%s/%s/%s' "$CT_WORKSPACE" "$WS_CODE_DIR" "$1"; } # COMMIT

# ensure_snapshot COMMIT: code/<commit>/ exists (made from the repository when it is missing).
ensure_snapshot() {
  local dir tmp
  [[ "$1" =~ ^([0-9a-f]{40}|[0-9a-f]{64})$ ]] || die "'$1' is not a full commit id" 2
  dir="$(snapshot_path "$1")"
  [[ -L "$dir" ]] && die "$dir is a symlink, not a snapshot: remove it, then run job1 again" 2
  [[ -d "$dir" ]] && return 0
  repo_git cat-file -e "$1^{commit}" 2>/dev/null ||
    die "no snapshot of commit $1 and the repository lacks it: run job1 for that commit again" 2
  tmp="$(mktemp -d "$dir.XXXXXX.tmp")"
  chmod 755 "$tmp" # readable by the container's user, like every file in it (mktemp made it 700)
  repo_git archive --format=tar "$1" | tar -x --no-same-owner -C "$tmp" ||
    die "cannot write the snapshot of commit $1 into $tmp"
  chmod -R a-w "$tmp"
  mv -T "$tmp" "$dir"
  log "code of commit $1 in $dir (read-only)"
}

# use_commit COMMIT: the commit this job works on: CODE_COMMIT, and CODE, its snapshot (job2
# inspects it, docker builds from it, runs train it).
use_commit() {
  ensure_snapshot "$1"
  CODE_COMMIT="$1"
  CODE="$(snapshot_path "$1")"
  [[ -f "$CODE/train.py" ]] || die "commit $1 has no train.py: nothing to train" 2
}

# Atomic writes: temp file in the same folder, then rename.
write_file() { # PATH TEXT
  local tmp
  mkdir -p "$(dirname "$1")"
  tmp="$(mktemp "$1.XXXXXX.tmp")"
  printf '%s\n' "$2" >"$tmp"
  mv -f "$tmp" "$1"
}

# ----------------------------------------------------------------------------------- data
has_cifar() { [[ -d "$1/$WS_DATA_FOLDER" || -f "$1/$WS_DATA_ARCHIVE" ]]; }

# Seed $CT_WORKSPACE/data from CT_DATA_DIR once (hard links when possible: no copy of the bytes).
# With no dataset anywhere, DATA_FLAGS=(--download): train.py fetches it (official checksum).
# shellcheck disable=SC2034 # used by job3-train.sh and job5-tune.sh
DATA_FLAGS=()
ensure_data() {
  # shellcheck disable=SC2153 # WS_DATA_DIR (the workspace's data/) is set above, not CT_DATA_DIR
  local dst="$CT_WORKSPACE/$WS_DATA_DIR" src="$CT_DATA_DIR" item
  mkdir -p "$dst"
  has_cifar "$dst" && return 0
  if [[ -z "$src" ]]; then
    log "no dataset in $dst and CT_DATA_DIR is empty: train.py downloads CIFAR-10 (--download)"
    # shellcheck disable=SC2034
    DATA_FLAGS=(--download)
    return 0
  fi
  has_cifar "$src" ||
    die "CT_DATA_DIR=$src holds neither $WS_DATA_FOLDER/ nor $WS_DATA_ARCHIVE" 2
  if [[ -d "$src/$WS_DATA_FOLDER" ]]; then item="$WS_DATA_FOLDER"; else item="$WS_DATA_ARCHIVE"; fi
  cp -al "$src/$item" "$dst/" 2>/dev/null || cp -a "$src/$item" "$dst/"
  log "dataset seeded: $dst/$item (from $src)"
}

# changes [COMMIT]: "changed DATA_VERSION" or "unchanged DATA_VERSION" against the judged runs
# (COMMIT, else the latest push; the data version now; CT_TRAIN_ARGS; FORCE), decided by
# ct.pipeline.changes, which says why on stderr.
changes() { ct_py ct.pipeline.changes --workspace "$CT_WORKSPACE" check ${1:+--commit "$1"}; }

# ----------------------------------------------------------------------------------- images
# detect_framework: print pytorch|tensorflow|sklearn from the commit's network.py/train.py
# (use_commit sets CODE).
detect_framework() {
  local files=() f
  for f in network.py train.py; do [[ -f "$CODE/$f" ]] && files+=("$CODE/$f"); done
  ((${#files[@]})) || die "no network.py or train.py in commit $CODE_COMMIT to inspect" 2
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

# dockerfile_for FRAMEWORK ROLE: the Dockerfile (relative to the commit's code) for that framework.
dockerfile_for() {
  local name
  if [[ "$1" == pytorch ]]; then name="Dockerfile.$2"; else name="Dockerfile.$1.$2"; fi
  [[ -f "$CODE/$name" ]] ||
    die "framework $1 detected, but the commit has no $name to build its $2 image (PyTorch uses Dockerfile.train / Dockerfile.tune)" 2
  printf '%s' "$name"
}

# image_tag ROLE DOCKERFILE: tag by the content of what goes into the image.
image_tag() {
  local hash
  hash="$(cd "$CODE" && {
    printf 'base=%s\n' "$CT_BASE_IMAGE"
    for f in "$2" requirements.txt requirements-tune.txt .dockerignore; do
      printf '%s\n' "$f"
      if [[ -f "$f" ]]; then cat "$f"; fi
    done
  } | sha256sum | cut -c1-16)"
  printf '%s-%s:%s' "$CT_IMAGE_PREFIX" "$1" "$hash"
}

# ensure_image ROLE: print the image for ROLE (train|tune), building it only when that tag is new.
# Records FRAMEWORK and <ROLE>_IMAGE in the image record.
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
      -f "$CODE/$dockerfile" -t "$tag" "$CODE" >&2 ||
      die "docker build of $dockerfile failed"
  fi
  record_set image FRAMEWORK "$framework" "${role^^}_IMAGE" "$tag" \
    "${role^^}_DOCKERFILE" "$dockerfile" || die "cannot record the image (see the line above)" 2
  printf '%s' "$tag"
}

# The files of this checkout that go into the serving image: Dockerfile.serve's COPY sources and
# what its build reads (tests/test_job7.py checks the list against the Dockerfile).
SERVE_IMAGE_SOURCES=(Dockerfile.serve requirements-serve.txt .dockerignore ct/__init__.py
  ct/images.py ct/untrusted.py ct/cpu_budget.py ct/data_version.py ct/atomic.py ct/workspace.py
  ct/serving)

# serve_image: print the serving image, built from this checkout's Dockerfile.serve only when no
# image has the tag of its content (SERVE_IMAGE_SOURCES and CT_SERVE_BASE_IMAGE). It runs no
# pushed code: the serving code is the pipeline's own, copied in.
serve_image() {
  local tag build=()
  [[ -f "$CT_ROOT/Dockerfile.serve" ]] || die "no Dockerfile.serve in $CT_ROOT to build the serving image from" 2
  tag="$CT_SERVE_IMAGE:$(cd "$CT_ROOT" && {
    printf 'base=%s\n' "$CT_SERVE_BASE_IMAGE"
    find "${SERVE_IMAGE_SOURCES[@]}" -type f ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-16)"
  if docker image inspect "$tag" >/dev/null 2>&1; then
    log "serving image $tag exists (same Dockerfile.serve, requirements and code): not rebuilding"
  else
    log "building the serving image $tag from Dockerfile.serve"
    [[ -n "$CT_SERVE_BASE_IMAGE" ]] && build+=(--build-arg "BASE_IMAGE=$CT_SERVE_BASE_IMAGE")
    docker build "${build[@]}" --label ct.role=serve -f "$CT_ROOT/Dockerfile.serve" -t "$tag" \
      "$CT_ROOT" >&2 || die "docker build of Dockerfile.serve failed"
  fi
  printf '%s' "$tag"
}

# ----------------------------------------------------------------------------------- after a run
# after_run [--outbox-only] [--run-dir RUN_DIR]: what follows every finished training or tuning
# run, whoever started it (job4, job5, job6 --follow), decided by ct.pipeline.after_run: judge,
# promote, mail, report, once per run. A training run below the threshold needs the tuning image
# first; only then does gate.properties hand the run to job5 (TUNE=true). A run that may be
# promoted is measured by the pipeline first (`measure COMMIT MODEL`, judged again with
# --measured); a best model without a score on the run's test set is re-scored first (`rescore
# COMMIT MODEL`), then the run is judged again, once: ct.pipeline.after_run never asks twice.
after_run() {
  local next word commit model asked=()
  next="$(ct_py ct.pipeline.after_run --workspace "$CT_WORKSPACE" judge --threshold "$CT_THRESHOLD" "$@")" ||
    exit $?
  read -r word commit model <<<"$next"
  if [[ "$word" == measure ]]; then
    measure_candidate "$commit" "$model"
    asked=(--measured)
    next="$(ct_py ct.pipeline.after_run --workspace "$CT_WORKSPACE" judge --threshold "$CT_THRESHOLD" "${asked[@]}" "$@")" ||
      exit $?
    read -r word commit model <<<"$next"
  fi
  if [[ "$word" == rescore ]]; then
    rescore "$commit" "$model"
    next="$(ct_py ct.pipeline.after_run --workspace "$CT_WORKSPACE" judge --threshold "$CT_THRESHOLD" "${asked[@]}" --rescored "$@")" ||
      exit $?
  fi
  if [[ "$next" == tune ]]; then
    prepare_tuning_image
    ct_py ct.pipeline.after_run --workspace "$CT_WORKSPACE" handed-to-tuning >/dev/null || exit $?
  fi
}

# rescore COMMIT MODEL: evaluate the best model (MODEL, a workspace path) on the test set the data
# holds now, with the code of COMMIT, which trained it (its snapshot; on docker its training image,
# like a run of that commit), and wait for it: python -m ct.trainer.evaluate writes
# runs/eval-<time>-<sha>/metrics.json, which promotion then reads. When that code is gone for good,
# or cannot evaluate, nothing is promoted and the best model stays (exit 2).
rescore() {
  local commit="$1" model="$2" rc=0
  # its own words, not ensure_snapshot's: what is at stake here is the best model, not a run
  (ensure_snapshot "$commit") 2>/dev/null ||
    die "the best model's code (commit $commit) is gone and cannot be made again from $CT_WORKSPACE/$WS_CODE_REPO, so the best model cannot be re-scored on the new test set: nothing promoted, the best model stays (run job1 for commit $commit to bring its code back, then job4)" 2
  [[ -f "$(snapshot_path "$commit")/ct/trainer/evaluate.py" ]] ||
    die "commit $commit, which trained the best model, predates ct.trainer.evaluate, so the best model cannot be re-scored on the new test set: nothing promoted, the best model stays (evaluate $CT_WORKSPACE/$model by hand and run job4 again, or move $CT_WORKSPACE/$WS_BEST_FILE away to start a new best)" 2
  log "re-scoring the best model $model (commit $commit) on the test set the data holds now"
  with_model_code eval "$commit" ct.trainer.evaluate "$model" >&2 || rc=$?
  ((rc == 0)) ||
    die "the best model could not be re-scored (exit $rc, see above): nothing promoted, the best model stays" "$((rc == 2 ? 2 : 1))"
}

# export_champion COMMIT MODEL: the champion (MODEL, a workspace path) to ONNX with the code of
# COMMIT, which trained it, as rescore evaluates it (python -m ct.trainer.export writes
# runs/export-<time>-<sha>/ and prints that folder last), then recorded on the host: checked,
# copied into models/ and named in best.json's "export" (ct.pipeline.exported record).
export_champion() {
  local commit="$1" model="$2" out rc=0
  (ensure_snapshot "$commit") 2>/dev/null ||
    die "the champion's code (commit $commit) is gone and cannot be made again from $CT_WORKSPACE/$WS_CODE_REPO, so the champion cannot be exported: nothing deployed, the service keeps its model (run job1 for commit $commit to bring its code back, then job7)" 2
  [[ -f "$(snapshot_path "$commit")/ct/trainer/export.py" ]] ||
    die "commit $commit, which trained the champion, predates ct.trainer.export, so the champion cannot be exported: nothing deployed, the service keeps its model (a model trained by newer code deploys)" 2
  log "exporting the champion $model (commit $commit) to ONNX"
  out="$(with_model_code export "$commit" ct.trainer.export "$model")" || rc=$?
  ((rc == 0)) || die "the champion could not be exported (exit $rc, see above): nothing deployed" "$((rc == 2 ? 2 : 1))"
  ct_py ct.pipeline.exported record --workspace "$CT_WORKSPACE" "${out##*$'\n'}" >&2 ||
    die "the champion's export was not recorded (see above): nothing deployed" 2
}

# measure_candidate COMMIT MODEL: the pipeline's own measurement of the run's model (MODEL, a
# workspace path) before it may be promoted. Exported with the code of COMMIT, which trained it, as
# the champion is (with_model_code; the recipe's own test-time views, scored on the parity images
# only), then the graph is scored by the pipeline's code: on docker the serving image of this
# checkout, locked down as the service (no network either), the workspace and the data read-only;
# local: $CT_PYTHON. ct.pipeline.measured says what to mount and read, and records the result.
measure_candidate() {
  local commit="$1" model="$2" out run text line mounts=() args=() rc=0
  if ! (ensure_snapshot "$commit") 2>/dev/null || [[ ! -f "$(snapshot_path "$commit")/ct/trainer/export.py" ]]; then
    die "the code of commit $commit, which trained $model, is gone or predates ct.trainer.export, so the pipeline cannot measure it: nothing promoted" 2
  fi
  log "measuring the candidate $model (commit $commit): exported with its code, scored by the pipeline's"
  out="$(with_model_code measure "$commit" ct.trainer.export "$model" --views recipe --parity-only)" || rc=$?
  ((rc == 0)) || die "the candidate could not be exported (exit $rc, see above): nothing promoted" "$((rc == 2 ? 2 : 1))"
  run="${out##*$'\n'}"
  text="$(ct_py ct.pipeline.measured --workspace "$CT_WORKSPACE" args --runtime "$CT_RUNTIME" --export "$run")" || exit $?
  mapfile -t args <<<"$text"
  if [[ "$CT_RUNTIME" == docker ]]; then
    text="$(ct_py ct.pipeline.measured --workspace "$CT_WORKSPACE" mounts --runtime docker)" || exit $?
    mapfile -t mounts <<<"$text"
    line="$(docker run --rm --name "$(container_name measure-score)" --label ct.role=measure \
      --label "ct.workspace=$CT_WORKSPACE" --network none "${SERVING_LOCKDOWN[@]}" "${mounts[@]}" \
      --entrypoint python "$(serve_image)" -m ct.serving.measure "${args[@]}")" || rc=$?
  else
    line="$(ct_py ct.serving.measure "${args[@]}")" || rc=$?
  fi
  ((rc == 0)) || die "the pipeline could not measure the candidate (exit $rc, see above): nothing promoted" "$((rc == 2 ? 2 : 1))"
  ct_py ct.pipeline.measured --workspace "$CT_WORKSPACE" record --export "$run" <<<"$line" ||
    die "the candidate's measurement was not recorded (see above): nothing promoted" 2
}

# with_model_code ROLE COMMIT MODULE MODEL [FLAG...]: python -m MODULE MODEL --out <the workspace>
# [FLAG...] with the code of COMMIT (its snapshot; on docker its training image as a run of that
# commit, sandbox_args, as container ct-ROLE-<id>; local: PYTHONPATH), the increments passed on,
# and wait for it. Its stdout is this function's; its exit status too.
with_model_code() {
  local role="$1" commit="$2" module="$3" model="$4" image args=()
  shift 4
  resolve_runtime
  use_commit "$commit"
  image="$(select_image train)"
  require_increments_dir
  if [[ "$CT_RUNTIME" == docker ]]; then
    docker rm -f "$(container_name "$role")" >/dev/null 2>&1 || true # one a killed job left behind
    # as launch runs train.py: the snapshot read-only at /code, the other snapshots hidden, not root
    sandbox_args "$role" "$(container_name "$role")" "$commit"
    docker run --rm "${SANDBOX[@]}" -e PYTHONPATH=/code "$image" -m "$module" \
      "/workspace/$model" --out /workspace "${INCREMENT_ARGS[@]}" "$@"
  else
    [[ -z "$CT_INCREMENTS_DIR" ]] || args+=(--increments "$CT_INCREMENTS_DIR")
    (cd "$CT_WORKSPACE" && CT_COMMIT="$commit" PYTHONPATH="$CODE" PYTHONDONTWRITEBYTECODE=1 \
      exec "$CT_PYTHON" -m "$module" "$CT_WORKSPACE/$model" --out "$CT_WORKSPACE" "${args[@]}" "$@")
  fi
}

prepare_tuning_image() { # for the commit of the run this build judged
  resolve_runtime
  use_commit "$(record_get gate COMMIT)"
  select_image tune >/dev/null
}

# select_image ROLE: the image for ROLE (train|tune) of the commit in CODE (use_commit), printed
# and recorded in the image record: on docker the image of the detected framework, built when its tag is new;
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
  record_set image FRAMEWORK "$framework" "${role^^}_IMAGE" local ||
    die "cannot record the image (see the line above)" 2
  log "framework $framework: local runtime, no image ($CT_PYTHON)"
  printf 'local'
}

# ----------------------------------------------------------------------------------- processes
# shellcheck source=scripts/lib-process.sh
source "$CT_ROOT/scripts/lib-process.sh"
