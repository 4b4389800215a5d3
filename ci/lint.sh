#!/usr/bin/env bash
# The house's habits, checked before the tests (in ci/run and `make lint`): ruff (lint and
# format), the import-layer contract (pyproject [tool.importlinter]) and mypy on the extension
# points (pyproject [tool.mypy]).
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check streambench tests bench examples
ruff format --check streambench tests bench examples
lint-imports
mypy
