#!/usr/bin/env bash
# job2 inspect + image: tell the framework from network.py/train.py and make sure the training
# image exists, building it only when no image is tagged with the hash of its Dockerfile +
# requirements (+ base image). Writes status/image.properties (FRAMEWORK, TRAIN_IMAGE, ...).
#
#   scripts/job2-image.sh [train|tune]     (default: train)
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

role="${1:-train}"
[[ "$role" == train || "$role" == tune ]] || die "usage: job2-image.sh [train|tune]" 2
require_workspace_code
resolve_runtime

if [[ "$CT_RUNTIME" == docker ]]; then
  image="$(ensure_image "$role")"
else
  framework="$(detect_framework)"
  [[ "$framework" == pytorch ]] ||
    die "the local runtime runs PyTorch code only; detected $framework" 2
  "$CT_PYTHON" -c 'import torch' 2>/dev/null ||
    die "local runtime: $CT_PYTHON cannot import torch (pip install -r requirements.txt)" 2
  image=local
  props_set "$CT_WORKSPACE/status/image.properties" FRAMEWORK "$framework" "${role^^}_IMAGE" local
  log "framework $framework: local runtime, no image ($CT_PYTHON)"
fi
echo "$image"
