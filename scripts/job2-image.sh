#!/usr/bin/env bash
# job2 inspect + image: tell the framework from network.py/train.py and make sure the training
# image exists, building it only when no image is tagged with the hash of its Dockerfile +
# requirements (+ base image). Writes status/image.properties (FRAMEWORK, TRAIN_IMAGE, ...).
#
#   scripts/job2-image.sh [train|tune]     (default: train)
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

main() {
  local role="${1:-train}"
  [[ "$role" == train || "$role" == tune ]] || die "usage: job2-image.sh [train|tune]" 2
  require_workspace_code
  resolve_runtime
  select_image "$role"
  echo
}

main "$@"
