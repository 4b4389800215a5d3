# Developer shortcuts; CI (ci/run, reached as .ci/run) runs the same steps on a clean clone in a fresh venv.
.PHONY: install test lint format gate check

install:       ## the tool, the embedded model and the test/lint dependencies
	./install.sh test

lint:          ## ruff, the import-layer contract, mypy
	bash ci/lint.sh

format:        ## rewrite the code in the house style (ruff format + safe fixes)
	ruff format streambench tests bench examples
	ruff check --fix streambench tests bench examples

test:          ## the suite, two workers (~27 minutes on 2 cores)
	python3 -m pytest -q

gate:          ## the regression gate: a small sweep against ci/baseline.json
	bash ci/gate.sh

check: lint test gate
