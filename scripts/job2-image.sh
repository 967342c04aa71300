#!/usr/bin/env bash
# job2 inspect + image: tell the ML framework from the next commit to train (network.py /
# train.py of its snapshot) and build or pick its image (docker: <prefix>-<role>:<content hash>,
# built only when that tag is new; local runtime: check that this host's python runs it).
#
#   scripts/job2-image.sh [train|tune]
#
# The next commit is the oldest queued push; with none waiting (the weekly retrain, or job2
# started by hand) the latest push is queued again, so that job3 retrains it.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

main() {
  local role="${1:-train}" commit
  [[ "$role" == train || "$role" == tune ]] || die "usage: job2-image.sh [train|tune]" 2
  resolve_runtime
  commit="$(pushes head --retrain)" || exit $?
  use_commit "$commit"
  select_image "$role"
  echo
}

main "$@"
