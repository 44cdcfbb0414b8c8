# The two commands of the README: `make demo` and `make test`. Both set up .venv first;
# set-up is skipped (seconds) while pyproject.toml and constraints.txt are unchanged.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-slow bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[runtime,export,dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gmcnn-mobile demo

# lint-imports: the import rules of pyproject.toml ([tool.importlinter]; docs/ARCHITECTURE.md). Line coverage of
# the packages is printed after the tests (files at 100 % left out); what it excludes and why: [tool.coverage]
# in pyproject.toml. Reported only, not a pass/fail gate. The tests run in one worker per core (at most 4;
# pytest-xdist), one test module per unit of work: tests/conftest.py says how they share out.
test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n auto --dist loadscope --cov --cov-report=term

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Benchmarks: export the default model's TFLite artifacts (reused while up to date), then
# measure them; the report lands in bench-results/ (see docs/benchmarks/).
# Every file passes its gate with default flags at both shapes (the fallback keeps layers float where it
# must; which ones, per file: docs/TOLERANCES.md), so the benchmark measures them with the default gates.
BENCH_EXPORT_FLAGS ?=
bench: $(STAMP)
	$(VENV)/bin/gmcnn-mobile export --out artifacts --formats tflite --io tensor $(BENCH_EXPORT_FLAGS)
	$(VENV)/bin/gmcnn-mobile bench --artifacts artifacts --out bench-results

clean:
	rm -rf $(VENV) build *.egg-info
