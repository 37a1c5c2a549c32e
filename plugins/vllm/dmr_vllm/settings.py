"""vLLM runner settings from `_configure`: the `vllm` block and the runtime flags.

Both arrive as untrusted client input. The `vllm` block (docs/compatibility.md §4) carries the
structured options; runtime flags go through an allow-list of vLLM options
that change how the model runs, never what is served or where (model, socket,
tokenizer, API key, chat template files and remote code are dmr's to decide).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

__all__ = [
    "ALLOWED_RUNTIME_FLAGS",
    "BLOCK_ONLY_OPTIONS",
    "EXECUTOR_BACKENDS",
    "VllmSettings",
    "resolve_settings",
    "split_flags",
]

_N = TypeVar("_N", int, float)

EXECUTOR_BACKENDS = frozenset({"mp", "ray", "uni", "external_launcher"})

# Options dmr reads itself (the estimate and the command line depend on them);
# short aliases map to the long name.
_OWNED = {
    "--max-num-seqs": "--max-num-seqs",
    "--gpu-memory-utilization": "--gpu-memory-utilization",
    "--device-memory-utilization": "--gpu-memory-utilization",
    "--tensor-parallel-size": "--tensor-parallel-size",
    "-tp": "--tensor-parallel-size",
    "--pipeline-parallel-size": "--pipeline-parallel-size",
    "-pp": "--pipeline-parallel-size",
    "--distributed-executor-backend": "--distributed-executor-backend",
    "--hf-overrides": "--hf-overrides",
    "--speculative-config": "--speculative-config",
    "-sc": "--speculative-config",
    "--kv-cache-dtype": "--kv-cache-dtype",
}

# Keys of the `vllm` block that are not vLLM options but where its Ray workers run:
# `ray-address` becomes the runner's RAY_ADDRESS (the cluster vLLM joins), and
# `ray-per-worker-gpus` vLLM's VLLM_RAY_PER_WORKER_GPUS (a share below 1 lets workers
# share a GPU). Not runtime flags: vLLM's command line has no such options.
BLOCK_ONLY_OPTIONS = frozenset({"--ray-address", "--ray-per-worker-gpus"})
# `auto` (the cluster on this machine), or host:port, optionally as a Ray client URL.
_RAY_ADDRESS = re.compile(
    r"auto|(ray://)?[A-Za-z0-9.\-]+:\d{1,5}|(ray://)?\[[0-9A-Fa-f:.]+\]:\d{1,5}"
)

# vLLM options passed through unchanged. Boolean options take no value and have
# `--no-` twins (argparse BooleanOptionalAction).
_VALUE_FLAGS = frozenset(
    {
        "--dtype",
        "--quantization",
        "-q",
        "--seed",
        "--block-size",
        "--max-num-batched-tokens",
        "--kv-cache-memory-bytes",
        "--cpu-offload-gb",
        "--max-logprobs",
        "--logprobs-mode",
        "--tool-call-parser",
        "--reasoning-parser",
        "--override-generation-config",
        "--limit-mm-per-prompt",
        "--mm-processor-kwargs",
        "--compilation-config",
        "--optimization-level",
        "--performance-mode",
        "--scheduling-policy",
        "--uvicorn-log-level",
        "--response-role",
        "--default-chat-template-kwargs",
        "--num-gpu-blocks-override",
        "--max-parallel-loading-workers",
        "--data-parallel-size",
        "-dp",
    }
)
_BOOLEAN_FLAGS = frozenset(
    {
        "--enforce-eager",
        "--enable-prefix-caching",
        "--enable-chunked-prefill",
        "--enable-auto-tool-choice",
        "--enable-log-requests",
        "--enable-prompt-tokens-details",
        "--enable-force-include-usage",
        "--return-tokens-as-token-ids",
        "--async-scheduling",
        "--enable-expert-parallel",
        "--disable-custom-all-reduce",
        "--language-model-only",
        "--ray-workers-use-nsight",
    }
)
_SWITCHES = frozenset(
    {*_BOOLEAN_FLAGS, *("--no-" + name.removeprefix("--") for name in _BOOLEAN_FLAGS)}
    | {"--disable-log-stats", "-ep"}
)

ALLOWED_RUNTIME_FLAGS = frozenset({*_OWNED, *_VALUE_FLAGS, *_SWITCHES})


@dataclass(frozen=True)
class VllmSettings:
    """How one vLLM runner is started. `None` leaves the choice to dmr's defaults or vLLM."""

    max_num_seqs: int | None = None
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    hf_overrides: Mapping[str, Any] | None = None
    speculative_config: Mapping[str, Any] | None = None
    kv_cache_dtype: str | None = None
    ray_address: str | None = None
    ray_per_worker_gpus: float | None = None
    extra: tuple[str, ...] = field(default=())  # allowed flags passed through verbatim

    @property
    def workers(self) -> int:
        """vLLM's world size: one worker per tensor shard of each pipeline stage."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


def split_flags(flags: Sequence[str]) -> list[tuple[str, str | None]]:
    """[(name, value or None)], checked against the allow-list.

    Raises ValueError naming the first flag vLLM runners may not be given.
    """
    pairs: list[tuple[str, str | None]] = []
    index = 0
    while index < len(flags):
        token = flags[index]
        index += 1
        if "/" in token or "\\" in token:
            raise ValueError(f"runtime flag {token!r} may not contain '/' or '\\'")
        if not token.startswith("-"):
            raise ValueError(f"runtime flag value {token!r} does not follow a flag")
        name, sep, inline = token.partition("=")
        if name not in ALLOWED_RUNTIME_FLAGS:
            raise ValueError(f"runtime flag {name} is not allowed for vllm")
        if name in _SWITCHES:
            if sep:
                raise ValueError(f"runtime flag {name} takes no value")
            pairs.append((name, None))
            continue
        if sep:
            pairs.append((name, inline))
            continue
        if index >= len(flags):
            raise ValueError(f"runtime flag {name} needs a value")
        value = flags[index]
        index += 1
        if "/" in value or "\\" in value:
            raise ValueError(f"runtime flag {value!r} may not contain '/' or '\\'")
        pairs.append((name, value))
    return pairs


def _number(
    name: str, value: Any, parse: Callable[[Any], _N], accepts: Callable[[_N], bool], what: str
) -> _N:
    """`value` (a number or its text; never a bool) as `parse` reads it, where `accepts`
    it; else a ValueError saying `name` expects `what`."""
    refusal = ValueError(f"{name} expects {what}, got {value!r}")
    try:
        number = parse(value)
    except (TypeError, ValueError):
        raise refusal from None
    if isinstance(value, bool) or not accepts(number):
        raise refusal
    return number


def _positive_int(name: str, value: Any) -> int:
    # The text must be the number: 2.5 or "07" is refused, not read as 2 or 7.
    def accepts(number: int) -> bool:
        return number > 0 and str(number) == str(value).strip()

    return _number(name, value, int, accepts, "a positive integer")


def _fraction(name: str, value: Any) -> float:
    return _number(name, value, float, lambda number: 0 < number <= 1, "a number in (0, 1]")


def _json_object(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as error:
            raise ValueError(f"{name} expects a JSON object: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} expects a JSON object, got {value!r}")
    return value


def _backend(name: str, value: Any) -> str:
    if value not in EXECUTOR_BACKENDS:
        choices = ", ".join(sorted(EXECUTOR_BACKENDS))
        raise ValueError(f"{name} expects one of {choices}, got {value!r}")
    return str(value)


def _ray_address(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _RAY_ADDRESS.fullmatch(value):
        raise ValueError(f"{name} expects 'auto' or HOST:PORT (or ray://HOST:PORT), got {value!r}")
    return value


def _text(_name: str, value: Any) -> str:
    return str(value)


# Each option this engine owns (its long `--` form): the field it sets and the check
# that turns the flag's or `_configure`'s value into the field's.
_SETTERS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "--ray-address": ("ray_address", _ray_address),
    "--ray-per-worker-gpus": ("ray_per_worker_gpus", _fraction),
    "--max-num-seqs": ("max_num_seqs", _positive_int),
    "--gpu-memory-utilization": ("gpu_memory_utilization", _fraction),
    "--tensor-parallel-size": ("tensor_parallel_size", _positive_int),
    "--pipeline-parallel-size": ("pipeline_parallel_size", _positive_int),
    "--distributed-executor-backend": ("distributed_executor_backend", _backend),
    "--hf-overrides": ("hf_overrides", _json_object),
    "--speculative-config": ("speculative_config", _json_object),
    "--kv-cache-dtype": ("kv_cache_dtype", _text),
}


def _apply(settings: VllmSettings, name: str, value: Any) -> VllmSettings:
    """`settings` with one owned option set (name in its long `--` form)."""
    field_name, check = _SETTERS[name]
    return replace(settings, **{field_name: check(name, value)})


def resolve_settings(block: Mapping[str, Any] | None, flags: Sequence[str]) -> VllmSettings:
    """The `vllm` block of `_configure` first, then the runtime flags (the last word wins).

    Block keys are the option names without dashes (`hf-overrides`, and
    `hf_overrides` is accepted too); unknown keys are refused.
    """
    settings = VllmSettings()
    for key, value in (block or {}).items():
        name = "--" + str(key).replace("_", "-")
        if _OWNED.get(name) != name and name not in BLOCK_ONLY_OPTIONS:
            names = {*_OWNED.values(), *BLOCK_ONLY_OPTIONS}
            known = ", ".join(sorted(n.removeprefix("--") for n in names))
            raise ValueError(f"unknown vllm option {key!r} (known: {known})")
        if value is not None:
            settings = _apply(settings, name, value)
    extra: list[str] = []
    for name, value in split_flags(flags):
        owned = _OWNED.get(name)
        if owned is not None:
            settings = _apply(settings, owned, value)
        else:
            extra.extend([name] if value is None else [name, value])
    return replace(settings, extra=tuple(extra))
