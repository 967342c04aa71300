#!/usr/bin/env bash
# job2 inspect + image: tell the ML framework from the next commit to train (network.py /
# train.py of its snapshot) and build or pick its image (docker: <prefix>-<role>:<content hash>,
# built only when that tag is new; local runtime: check that this host's python runs it).
#
#   scripts/job2-image.sh [train|tune]
#
# The commit is COMMIT, job2's Jenkins parameter (the push job1 passes on), when it is set; else
# the oldest queued push; with none waiting (the weekly retrain, or job2 started by hand) the
# latest push, queued again, so that job3 retrains it. job3 trains the oldest queued push and
# builds its image when it is missing.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

main() {
  local role="${1:-train}" commit
  [[ "$role" == train || "$role" == tune ]] || die "usage: job2-image.sh [train|tune]" 2
  resolve_runtime
  commit="${COMMIT:-}"
  [[ -n "$commit" ]] || commit="$(pushes head --retrain)" || exit $?
  use_commit "$commit"
  select_image "$role"
  echo
}

main "$@"
