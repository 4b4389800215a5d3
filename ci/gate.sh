#!/usr/bin/env bash
# The project's own gate (run by ci/run after the tests): a small sweep on the embedded model,
# then `streambench gate` against ci/baseline.json. Refresh the baseline after an intended change:
#   bash ci/gate.sh --update
set -euo pipefail
cd "$(dirname "$0")/.."
streambench sweep ci/gate.yaml --force -q
streambench gate --baseline ci/baseline.json --store results/ci-gate/gate.sqlite "$@"
