# Thin wrappers over pip, the test script and docker (README: "Web page, container and
# Make targets"; docs/container.md).
PYTHON ?= python
IMAGE ?= dmr
PORT ?= 12434
MODELS_PATH ?= $(HOME)/.docker/models
LLAMA_VARIANT ?= cpu
VLLM ?= none

.PHONY: help build run test clean docker-build docker-run

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

build: ## install dmr and its plugins, editable
	$(PYTHON) -m pip install -e . -e plugins/apis -e plugins/llamacpp

run: ## start the server (dmr serve)
	dmr serve

test: ## the whole test suite, as in the README
	scripts/test

clean: ## remove caches and build outputs
	rm -rf build dist .mypy_cache .ruff_cache .pytest_cache test-artifacts
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -name '*.egg-info' -type d -prune -exec rm -rf {} +

docker-build: ## build the image (LLAMA_VARIANT=cpu|cuda|rocm|vulkan, VLLM=none|cuda|cpu)
	docker build --build-arg LLAMA_VARIANT=$(LLAMA_VARIANT) --build-arg VLLM=$(VLLM) -t $(IMAGE) .

docker-run: ## run the image: make docker-run PORT=12434 MODELS_PATH=~/.docker/models
	docker run --rm -p $(PORT):12434 -v $(MODELS_PATH):/models $(IMAGE)
