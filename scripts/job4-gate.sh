#!/usr/bin/env bash
# job4 gate: what follows a finished run (lib.sh after_run, ct.pipeline.after_run): validate
# accuracy.txt against CT_THRESHOLD (ct.pipeline.gate). At or above: promote the run's model when
# it beats the best one (ct.pipeline.promote) and mail that the best model is created
# (ct.pipeline.notify). Below: build the tuning image and hand over to job5 (gate.properties
# TUNE=true). A missing/garbled/NaN/out-of-range accuracy: exit 2. Each run is judged once; a
# second build for the same run writes its verdict again with TUNE=false.
#
#   scripts/job4-gate.sh [RUN_DIR]
#
# RUN_DIR (from job6's hand-over, or empty): the run this build was asked to judge; when it is no
# run folder of the workspace (runs/<id>, no link), or the latest run is another one, nothing is
# judged (exit 2).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

main() {
  (($# <= 1)) || die "usage: job4-gate.sh [RUN_DIR]" 2
  [[ -d "$CT_WORKSPACE" ]] || die "no workspace at CT_WORKSPACE=$CT_WORKSPACE" 2
  # one word, so that a RUN_DIR starting with '-' is a value that ct.pipeline.after_run refuses
  after_run --run-dir="${1:-}"
}

main "$@"
