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

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Benchmarks: export the default model's TFLite artifacts (reused while up to date), then
# measure them; the report lands in bench-results/ (see docs/benchmarks/).
bench: $(STAMP)
	$(VENV)/bin/gmcnn-mobile export --out artifacts --formats tflite --io tensor
	$(VENV)/bin/gmcnn-mobile bench --artifacts artifacts --out bench-results

clean:
	rm -rf $(VENV) build *.egg-info
