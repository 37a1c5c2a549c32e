"""The llama.cpp engine as the scheduler sees it: status, runner command, memory estimate.

This module runs inside `dmr serve`, which must never import llama_cpp: the
version comes from package metadata and model facts from the GGUF header.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from dmr.sdk import (
    EngineState,
    EngineStatus,
    MemoryEstimate,
    Mode,
    RunnerCommand,
    RunnerLaunch,
    read_gguf,
)

from dmr_llamacpp.bundle import find_gguf_bundle
from dmr_llamacpp.huge_pages import huge_page_env, huge_pages_available
from dmr_llamacpp.settings import (
    WorkerSettings,
    apply_flags,
    parse_llama_args,
    parse_runtime_flags,
    sets_parallel,
    split_known_flags,
)

__all__ = [
    "DEFAULT_CONTEXT_SIZE",
    "MAX_DEFAULT_CONTEXT_SIZE",
    "LlamaCppEngine",
    "find_llama_server",
    "prompt_cache_max_bytes",
    "weights_placement",
    "worker_settings",
]

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_SIZE = 4096  # per slot: the least default, and pooling runners' default
# A chat runner's default context is the model's trained context where memory
# allows (docs/scheduler.md): at most this many tokens per slot, and the runner's
# whole estimate (all slots' KV cache included) within this share of the memory
# free for dmr on its device (admission's budget), so another model still fits.
MAX_DEFAULT_CONTEXT_SIZE = 32768
DEFAULT_CONTEXT_MEMORY_SHARE = 0.5
# More streams than llama-server's fixed slots (docs/scheduler.md): a chat runner
# nobody set `--parallel` for gets 8 slots, doubled up to this many while its whole
# estimate stays within this share of its device's whole memory, and within the
# context's share of admission's budget; the context per slot is chosen first. The
# device's whole memory, not what is free: the slot count is part of the prompt
# caches' key, and a server restarted while other programs held more memory would
# otherwise size other slots and find none of its saved prompts (CI saw it). The
# runner then lets requests into the slots beyond 8 only while the step cost it
# measures says the bigger batch pays (runner/slot_limit.py).
MAX_DEFAULT_SLOTS = 32
DEFAULT_SLOTS_MEMORY_SHARE = 0.25
GPU_ALL_LAYERS = 999
# Compute buffers and scratch space beside weights and KV cache.
COMPUTE_MARGIN_BYTES = 256 * 1024 * 1024
COMPUTE_MARGIN_FRACTION = 0.10
KV_BYTES_PER_ELEMENT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 1.0625}
# Disk for prompt caches kept across loads, all models together (docs/scheduler.md).
PROMPT_CACHE_MAX_BYTES_ENV = "DMR_PROMPT_CACHE_MAX_BYTES"
DEFAULT_PROMPT_CACHE_MAX_BYTES = 1024**3


def prompt_cache_max_bytes(environ: dict[str, str] | None = None) -> int:
    """`DMR_PROMPT_CACHE_MAX_BYTES` (bytes, 0 = keep none), else 1 GiB."""
    env = os.environ if environ is None else environ
    raw = env.get(PROMPT_CACHE_MAX_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_PROMPT_CACHE_MAX_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(
            f"{PROMPT_CACHE_MAX_BYTES_ENV}={raw!r}: expected a number of bytes (0 keeps no "
            "prompt cache on disk)"
        )
    return value


def _context_size(
    launch: RunnerLaunch,
    settings: WorkerSettings,
    train_ctx: int | None,
    fits: Callable[[int], bool] | None = None,
) -> int:
    """Tokens per slot: `configure`'s, `LLAMA_ARGS`'s, the package's, else the default.

    The default, for chat runners (`fits` given), is the trained context up to
    `MAX_DEFAULT_CONTEXT_SIZE`, halved while the runner would not `fit` the
    memory, down to `DEFAULT_CONTEXT_SIZE` (or the trained context when smaller).
    """
    if launch.config.context_size:
        return launch.config.context_size
    if settings.ctx_size:
        return settings.ctx_size
    from_model = launch.model_config.get("context_size")
    if isinstance(from_model, int) and from_model > 0:
        return from_model
    least = min(train_ctx or DEFAULT_CONTEXT_SIZE, DEFAULT_CONTEXT_SIZE)
    if fits is None or launch.mode is not Mode.COMPLETION:
        return least
    context = max(least, min(train_ctx or DEFAULT_CONTEXT_SIZE, MAX_DEFAULT_CONTEXT_SIZE))
    while context > least and not fits(context):
        context = max(least, context // 2)
    return context


def worker_settings(
    launch: RunnerLaunch, *, environ: dict[str, str] | None = None, native: bool = False
) -> WorkerSettings:
    """Defaults (`-ngl 999` on a GPU, metrics on), then `LLAMA_ARGS`, then `_configure`."""
    env = os.environ if environ is None else environ
    settings = WorkerSettings(
        n_gpu_layers=GPU_ALL_LAYERS if launch.device.is_gpu else 0,
        # Slots sized by the engine unless someone chose them (llama-server cannot adapt).
        adaptive_slots=not native and launch.mode is Mode.COMPLETION,
    )
    parallel_given = False
    llama_args = env.get("LLAMA_ARGS", "").strip()
    if llama_args:
        flags = parse_llama_args(llama_args, allow_unknown=True)  # refuses dmr's own flags
        parallel_given = sets_parallel(flags)
        if not native:
            flags, ignored = split_known_flags(flags)
            _warn_ignored(ignored)
        settings = apply_flags(settings, flags, allow_unknown=native)
    if launch.config.runtime_flags:
        runtime_flags = parse_runtime_flags(launch.config.runtime_flags)
        settings = apply_flags(settings, runtime_flags)
        parallel_given = parallel_given or sets_parallel(runtime_flags)
    options = launch.config.engine_options.get("llamacpp") or {}
    if "parallel" in options:
        settings = apply_flags(settings, ["--parallel", str(int(options["parallel"]))])
        parallel_given = True
    if parallel_given:
        settings = replace(settings, adaptive_slots=False)
    if options.get("reasoning-budget") is not None:
        settings = apply_flags(
            settings, ["--reasoning-budget", str(int(options["reasoning-budget"]))]
        )
    # `_configure`'s speculative block, in llama-server's terms.
    if launch.config.speculative_num_tokens:
        settings = apply_flags(
            settings, ["--draft-max", str(int(launch.config.speculative_num_tokens))]
        )
    if launch.config.speculative_min_acceptance_rate is not None:
        settings = apply_flags(
            settings, ["--draft-p-min", str(float(launch.config.speculative_min_acceptance_rate))]
        )
    return settings


# What Docker Model Runner finds in its LLAMA_SERVER_PATH folder: the upstream name
# first, then its own (macOS and Docker Desktop builds).
LLAMA_SERVER_NAMES = ("llama-server", "com.docker.llama-server")


def find_llama_server(configured: Path) -> Path | None:
    """The native binary `LLAMA_SERVER_PATH` names: the executable itself, or a folder
    laid out as llama.cpp's or Docker Model Runner's builds install it - the binary in
    the folder or its `bin/`, or in one `com.docker.llama-server.native.<os>.<accel>.<arch>`
    folder inside it (DMR's build output)."""
    if configured.is_file():
        return configured if os.access(configured, os.X_OK) else None
    if not configured.is_dir():
        return None
    folders = [configured, configured / "bin"]
    for native in sorted(configured.glob("com.docker.llama-server.native.*")):
        folders += [native, native / "bin"]
    for folder in folders:
        for name in LLAMA_SERVER_NAMES:
            binary = folder / name
            if binary.is_file() and os.access(binary, os.X_OK):
                return binary
    return None


_warned_flags: set[str] = set()


def _warn_ignored(flags: list[str]) -> None:
    """One log line per flag and server process: the runner starts again for every load."""
    for flag in flags:
        if flag not in _warned_flags:
            _warned_flags.add(flag)
            logger.warning(
                "LLAMA_ARGS: %s has no effect in the llama-cpp-python runner and is ignored"
                " (LLAMA_SERVER_PATH runs llama.cpp's own llama-server, which honours it)",
                flag,
            )


def weights_placement(
    launch: RunnerLaunch,
    settings: WorkerSettings,
    *,
    huge_pages: bool,
    environ: Mapping[str, str] = os.environ,
) -> tuple[WorkerSettings, dict[str, str]]:
    """Where the runner keeps the weights, and the environment that takes them there.

    Where the CPU computes from them, `huge_pages` says the runner would get them
    (`huge_pages_available`) and nobody chose `--mmap` or `--no-mmap`: read into the
    runner's own memory, in huge pages (huge_pages.py). Elsewhere llama.cpp's default,
    the file mapped. Weights read into memory by choice (`--no-mmap`) get huge pages
    too."""
    on_cpu = not launch.device.is_gpu or settings.n_gpu_layers == 0
    if settings.mmap is None:
        settings = replace(settings, mmap=not (on_cpu and huge_pages))
    env = huge_page_env(environ) if settings.mmap is False and huge_pages else {}
    return settings, env


class LlamaCppEngine:
    """Starts `python -m dmr_llamacpp.runner` (or a native `llama-server`) per model and mode."""

    def status(self) -> EngineStatus:
        native = self._native_server()
        if native is not None:
            return EngineStatus(EngineState.RUNNING, f"llama-server at {native}")
        try:
            return EngineStatus(
                EngineState.RUNNING, f"llama-cpp-python {version('llama-cpp-python')}"
            )
        except PackageNotFoundError:
            return EngineStatus(EngineState.NOT_INSTALLED, "llama-cpp-python is not installed")

    def _native_server(self) -> Path | None:
        configured = os.environ.get("LLAMA_SERVER_PATH")
        return find_llama_server(Path(configured)) if configured else None

    def runner_command(self, launch: RunnerLaunch) -> RunnerCommand:
        if launch.mode not in (Mode.COMPLETION, Mode.EMBEDDING, Mode.RERANKING):
            raise ValueError(f"llama.cpp cannot serve mode {launch.mode.value!r}")
        native = self._native_server()
        settings = worker_settings(launch, native=native is not None)
        # Threads set by hand stay as set; llama-server (below) cannot change its own.
        shares = launch.device.kind == "cpu" and settings.threads is None
        shares = shares and settings.threads_batch is None
        if settings.threads is None and launch.device.node is not None and launch.device.cores:
            # On a cluster node, the CPUs the node declares (Ray's `--num-cpus`): a
            # node sharing its machine must not compute with every core of it.
            settings = replace(settings, threads=launch.device.cores)
        bundle = find_gguf_bundle(launch.bundle_dir)
        metadata = _gguf_metadata(bundle.model)
        ctx_size = self._chosen_context(launch, settings, metadata)
        settings = self._chosen_slots(launch, settings, metadata, ctx_size)
        if native is not None:
            # Its own loading flags differ between llama.cpp versions (`--no-mmap`,
            # `--load-mode`): a binary dmr did not build keeps its own default.
            return self._native_command(native, launch, settings, ctx_size)
        settings, env = weights_placement(launch, settings, huge_pages=huge_pages_available())
        chat_template = settings.chat_template_file or (
            str(bundle.chat_template) if bundle.chat_template else None
        )
        argv = [
            sys.executable,
            "-m",
            "dmr_llamacpp.runner",
            "--model",
            str(bundle.model),
            "--socket",
            str(launch.socket_path),
            "--mode",
            launch.mode.value,
            "--served-model-name",
            launch.model_name,
        ]
        argv += _replace_ctx(settings, ctx_size, chat_template).to_argv()
        # to_argv drops defaults; the runner's own defaults match, but say these outright.
        for option, value in (
            ("--ctx-size", ctx_size),
            ("--parallel", settings.parallel),
            ("--n-gpu-layers", settings.n_gpu_layers),
        ):
            if option not in argv:
                argv += [option, str(value)]
        if bundle.mmproj is not None:
            argv += ["--mmproj", str(bundle.mmproj)]
        max_bytes = prompt_cache_max_bytes()
        if launch.mode is Mode.COMPLETION and launch.prompt_cache_dir is not None and max_bytes:
            argv += [
                "--prompt-cache-dir",
                str(launch.prompt_cache_dir),
                "--prompt-cache-max-bytes",
                str(max_bytes),
            ]
        if launch.draft_bundle_dir is not None:
            if launch.mode is not Mode.COMPLETION:
                raise ValueError("a speculative draft model only applies to completion runners")
            argv += ["--model-draft", str(find_gguf_bundle(launch.draft_bundle_dir).model)]
        return RunnerCommand(argv=tuple(argv), env=env, startup_timeout=120.0, cpu_share=shares)

    def _native_command(
        self, binary: Path, launch: RunnerLaunch, settings: WorkerSettings, ctx_size: int
    ) -> RunnerCommand:
        bundle = find_gguf_bundle(launch.bundle_dir)
        argv = [
            str(binary),
            "--model",
            str(bundle.model),
            "--host",
            # llama-server listens on a unix socket when the host is a path ending in .sock.
            str(launch.socket_path),
            "--alias",
            launch.model_name,
            "--ctx-size",
            str(ctx_size * settings.parallel),
            "--parallel",
            str(settings.parallel),
            "-ngl",
            str(settings.n_gpu_layers),
            "--jinja",
        ]
        if settings.metrics:
            argv.append("--metrics")
        if os.environ.get("DMR_LLAMACPP_EXTRA_BUFTS") != "1":
            # A binary built by GCC 12 crashes with its repacked (AMX) weight buffers on
            # multi-token batches, and a native binary cannot be checked as the Python
            # runner's library is (docs/scheduler.md, "Extra weight buffers").
            argv.append("--no-repack")
        if launch.mode is Mode.EMBEDDING:
            argv.append("--embeddings")
        elif launch.mode is Mode.RERANKING:
            argv.append("--reranking")
        template = settings.chat_template_file or bundle.chat_template
        if template:
            argv += ["--chat-template-file", str(template)]
        if bundle.mmproj is not None:
            argv += ["--mmproj", str(bundle.mmproj)]
        if launch.draft_bundle_dir is not None:
            argv += ["--model-draft", str(find_gguf_bundle(launch.draft_bundle_dir).model)]
        for option, value in (
            ("--cache-ram", settings.cache_ram),
            ("--threads", settings.threads),
            ("--temp", settings.temperature),
            ("--top-k", settings.top_k),
            ("--top-p", settings.top_p),
            ("--min-p", settings.min_p),
        ):
            if value is not None:
                argv += [option, str(value)]
        argv += list(settings.extra)
        return RunnerCommand(argv=tuple(argv), env={}, startup_timeout=120.0)

    def _chosen_context(
        self, launch: RunnerLaunch, settings: WorkerSettings, metadata: dict[str, object]
    ) -> int:
        """The context per slot, the default checked against the memory free for dmr."""
        budget = DEFAULT_CONTEXT_MEMORY_SHARE * self._free_memory(launch)

        def fits(context: int) -> bool:
            estimate = self._estimate(launch, settings, metadata, context)
            return estimate.device_bytes <= budget

        return _context_size(launch, settings, _train_context(metadata), fits)

    @staticmethod
    def _free_memory(launch: RunnerLaunch) -> int:
        """Admission's budget for this runner, else what its device has free."""
        if launch.memory_budget is not None:
            return launch.memory_budget
        return launch.device.free_memory

    def estimate_memory(self, launch: RunnerLaunch) -> MemoryEstimate:
        """Weights (file size) + f16 KV cache for context x slots + a compute-buffer margin."""
        settings = worker_settings(launch, native=self._native_server() is not None)
        metadata = _gguf_metadata(find_gguf_bundle(launch.bundle_dir).model)
        context = self._chosen_context(launch, settings, metadata)
        settings = self._chosen_slots(launch, settings, metadata, context)
        return self._estimate(launch, settings, metadata, context)

    def _chosen_slots(
        self,
        launch: RunnerLaunch,
        settings: WorkerSettings,
        metadata: dict[str, object],
        context: int,
    ) -> WorkerSettings:
        """`settings` with the slots doubled, up to MAX_DEFAULT_SLOTS, while the
        runner's estimate stays within a share of the device's whole memory (and of
        admission's budget): the device, not the moment, decides the count, which is
        part of the saved prompt caches' key."""
        if not settings.adaptive_slots:
            return settings
        budget = min(
            DEFAULT_SLOTS_MEMORY_SHARE * launch.device.total_memory,
            DEFAULT_CONTEXT_MEMORY_SHARE * self._free_memory(launch),
        )
        slots = settings.parallel
        while slots * 2 <= MAX_DEFAULT_SLOTS:
            bigger = replace(settings, parallel=slots * 2)
            if self._estimate(launch, bigger, metadata, context).device_bytes > budget:
                break
            slots *= 2
        return replace(settings, parallel=slots)

    def _estimate(
        self,
        launch: RunnerLaunch,
        settings: WorkerSettings,
        metadata: dict[str, object],
        context: int,
    ) -> MemoryEstimate:
        bundle = find_gguf_bundle(launch.bundle_dir)
        ctx_total = context * settings.parallel
        if launch.mode is not Mode.COMPLETION:
            # Pooling runners keep one sequence per input; their context is the batch.
            ctx_total = context
        weights = bundle.weight_bytes + (bundle.mmproj.stat().st_size if bundle.mmproj else 0)
        sequences = settings.parallel if launch.mode is Mode.COMPLETION else 1
        kv_cache = kv_cache_bytes(metadata, ctx_total, settings)
        kv_cache += recurrent_state_bytes(metadata, sequences)
        if launch.draft_bundle_dir is not None and launch.mode is Mode.COMPLETION:
            # The draft model keeps its own weights and a KV cache as large as the model's.
            draft = find_gguf_bundle(launch.draft_bundle_dir)
            weights += draft.weight_bytes
            kv_cache += kv_cache_bytes(_gguf_metadata(draft.model), ctx_total, settings)
        compute = COMPUTE_MARGIN_BYTES + int(COMPUTE_MARGIN_FRACTION * (weights + kv_cache))
        # Host memory for prompts whose slot was taken (--cache-ram), at most this much.
        prompt_cache = settings.cache_ram * 1024 * 1024 if launch.mode is Mode.COMPLETION else 0
        if not launch.device.is_gpu or settings.n_gpu_layers == 0:
            return MemoryEstimate(device_bytes=weights + kv_cache + compute + prompt_cache)
        layers = _arch_int(metadata, "block_count") or 1
        on_gpu = min(1.0, settings.n_gpu_layers / layers)
        device = int((weights + kv_cache) * on_gpu) + compute
        return MemoryEstimate(
            device_bytes=device,
            host_bytes=weights + kv_cache - device + compute + prompt_cache,
        )


def _replace_ctx(
    settings: WorkerSettings, ctx_size: int, chat_template: str | None
) -> WorkerSettings:
    from dataclasses import replace

    return replace(settings, ctx_size=ctx_size, chat_template_file=chat_template)


# Per-layer arrays (head counts) are this short; token tables, far longer, are skipped.
_MAX_LAYER_ARRAY = 1024


def _gguf_metadata(path: Path) -> dict[str, object]:
    """The header's key/value pairs, read by core's checked reader (no llama_cpp here)."""
    return dict(read_gguf(path, max_array=_MAX_LAYER_ARRAY).metadata)


def _arch_int(metadata: dict[str, object], key: str) -> int | None:
    arch = metadata.get("general.architecture")
    value = metadata.get(f"{arch}.{key}")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list) and value and isinstance(value[0], int):
        return int(max(value))  # per-layer head counts
    return None


def _train_context(metadata: dict[str, object]) -> int | None:
    return _arch_int(metadata, "context_length")


def _layer_kv_heads(metadata: dict[str, object]) -> list[int]:
    """The KV heads of each layer: 0 for a layer that does not attend (the recurrent
    layers of a hybrid model list 0 in a per-layer array; a Mamba has no heads)."""
    arch = metadata.get("general.architecture")
    layers = _arch_int(metadata, "block_count") or 0
    for key in ("attention.head_count_kv", "attention.head_count"):
        value = metadata.get(f"{arch}.{key}")
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            return [int(v) for v in value]
        if isinstance(value, int) and not isinstance(value, bool):
            return [value] * layers
    return [1] * layers


def kv_cache_bytes(metadata: dict[str, object], ctx_total: int, settings: WorkerSettings) -> int:
    """2 (K and V) x tokens x the KV heads of every attending layer x head dim x bytes
    per element."""
    heads = _arch_int(metadata, "attention.head_count") or 1
    embedding = _arch_int(metadata, "embedding_length") or 0
    head_dim_k = _arch_int(metadata, "attention.key_length") or embedding // heads
    head_dim_v = _arch_int(metadata, "attention.value_length") or embedding // heads
    k_bytes = KV_BYTES_PER_ELEMENT.get(settings.cache_type_k, 0.5625)
    v_bytes = KV_BYTES_PER_ELEMENT.get(settings.cache_type_v, 0.5625)
    per_token = sum(_layer_kv_heads(metadata)) * (head_dim_k * k_bytes + head_dim_v * v_bytes)
    return int(per_token * ctx_total)


def recurrent_state_bytes(metadata: dict[str, object], sequences: int) -> int:
    """The state a Mamba-style layer keeps per sequence, whatever its length (f32, as
    llama.cpp keeps it): the convolution's last `conv_kernel - 1` inputs and the SSM
    state, for every layer that does not attend. 0 for a model without `ssm.*` keys."""
    inner = _arch_int(metadata, "ssm.inner_size")
    state = _arch_int(metadata, "ssm.state_size")
    kernel = _arch_int(metadata, "ssm.conv_kernel")
    if not (inner and state and kernel):
        return 0
    groups = _arch_int(metadata, "ssm.group_count") or 0  # Mamba-2's B and C groups
    recurrent_layers = sum(1 for kv_heads in _layer_kv_heads(metadata) if kv_heads == 0)
    per_layer = (kernel - 1) * (inner + 2 * groups * state) + inner * state
    return 4 * per_layer * recurrent_layers * sequences
