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
# The shipped model's int8 and int8-dynamic files fail the export gate's 38/40 dB: 34-37 dB hole PSNR
# against PyTorch at 512x680, and 8-9 dB at 1024x1360, where its activations reach 1.1e4 on the held-out
# samples (docs/TOLERANCES.md). Their cost is what any int8 file of this graph costs, so the benchmark
# lowers the gate to measure them; each file's parity and the limit used are in the manifest.
BENCH_EXPORT_FLAGS ?= --min-hole-psnr int8=5 --min-hole-psnr int8-dynamic=5
bench: $(STAMP)
	$(VENV)/bin/gmcnn-mobile export --out artifacts --formats tflite --io tensor $(BENCH_EXPORT_FLAGS)
	$(VENV)/bin/gmcnn-mobile bench --artifacts artifacts --out bench-results

clean:
	rm -rf $(VENV) build *.egg-info
