# Quick start: `make demo` runs the whole pipeline on the built-in default; `make test` runs the
# tests. Both create .venv and install requirements.txt on first use.
PY := .venv/bin/python
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test clean

.venv/installed: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	touch $@

demo: .venv/installed
	$(PY) -m jobs.pipeline $(ARGS)

test: .venv/installed
	$(PY) -m pytest -q -n 2 --dist worksteal $(ARGS)

clean:
	rm -rf runs cache .pytest_cache
