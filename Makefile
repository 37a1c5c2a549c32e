# Thin wrappers over pip, the test script and docker (README: "Web page, container and
# Make targets"; docs/container.md).
PYTHON ?= python
IMAGE ?= dmr
# docker-run's defaults are Docker Model Runner's own Makefile's: port 8080 and a
# models folder in the current directory.
PORT ?= 8080
MODELS_PATH ?= $(CURDIR)/models
# DMR's knobs: the llama.cpp variant (cpu|cuda|rocm|vulkan; LLAMA_VARIANT is the
# same, by dmr's older name) and version (a llama-cpp-python release whose llama.cpp
# the image builds, e.g. 0.3.36, or latest).
LLAMA_SERVER_VARIANT ?= cpu
LLAMA_VARIANT ?= $(LLAMA_SERVER_VARIANT)
LLAMA_SERVER_VERSION ?= latest
VLLM ?= none

.PHONY: help build run test clean docker-build docker-run

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

build: ## install dmr and its plugins, editable
	$(PYTHON) -m pip install -e . -e plugins/apis -e plugins/gpus -e plugins/llamacpp

run: ## start the server (dmr serve)
	dmr serve

test: ## the whole test suite, as in the README
	scripts/test

clean: ## remove caches and build outputs
	rm -rf build dist .mypy_cache .ruff_cache .pytest_cache test-artifacts
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -name '*.egg-info' -type d -prune -exec rm -rf {} +

docker-build: ## build the image (LLAMA_SERVER_VARIANT=cpu|cuda|rocm|vulkan, LLAMA_SERVER_VERSION=0.3.36|latest, VLLM=none|cuda|cpu)
	docker build --build-arg LLAMA_VARIANT=$(LLAMA_VARIANT) --build-arg LLAMA_SERVER_VERSION=$(LLAMA_SERVER_VERSION) --build-arg VLLM=$(VLLM) -t $(IMAGE) .

docker-run: ## run the image on PORT (8080) with the store in MODELS_PATH (./models)
	mkdir -p $(MODELS_PATH)
	docker run --rm -p $(PORT):$(PORT) -e MODEL_RUNNER_PORT=$(PORT) -v $(MODELS_PATH):/models $(IMAGE)
