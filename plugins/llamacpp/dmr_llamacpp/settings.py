"""Worker settings: defaults, `LLAMA_ARGS` and `_configure` runtime flags.

As DMR launches llama.cpp: docs/compatibility.md §6.

Everything a runner is started with goes through `WorkerSettings`, so the
engine can check flags in the server process and turn them into the runner's
command line; the runner parses the same command line back with
`runner_arg_parser`.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

__all__ = [
    "ALLOWED_RUNTIME_FLAGS",
    "FORBIDDEN_LLAMA_ARGS",
    "WorkerSettings",
    "apply_flags",
    "parse_llama_args",
    "parse_runtime_flags",
    "sets_parallel",
    "split_known_flags",
]

# Flags that would change what the runner serves or where: the engine decides those.
FORBIDDEN_LLAMA_ARGS = frozenset(
    {
        "-m",
        "--model",
        "-mu",
        "--model-url",
        "-hf",
        "-hfr",
        "--hf-repo",
        "-hff",
        "--hf-file",
        "--host",
        "--port",
        "--path",
        "--socket",
        "--embedding",
        "--embeddings",
        "--reranking",
        "--rerank",
        "--mmproj",
        "--mmproj-url",
        "-mm",
        "-mmu",
        # Paths to read or write outside the model's bundle.
        "-md",
        "--model-draft",
        "--lora",
        "--lora-scaled",
        "--control-vector",
        "--control-vector-scaled",
        "--log-file",
        "--slot-save-path",
        "--api-key-file",
        "--ssl-key-file",
        "--ssl-cert-file",
        "--static-path",
    }
)

# Option name -> (WorkerSettings field, converter). A converter of None is a bare switch.
_VALUE_FLAGS: dict[str, tuple[str, type]] = {}
_SWITCHES: dict[str, tuple[str, bool]] = {}


def _value(names: Iterable[str], attr: str, kind: type) -> None:
    for name in names:
        _VALUE_FLAGS[name] = (attr, kind)


def _switch(names: Iterable[str], attr: str, value: bool) -> None:
    for name in names:
        _SWITCHES[name] = (attr, value)


_value(("-c", "--ctx-size"), "ctx_size", int)
_value(("-np", "--parallel"), "parallel", int)
_value(("-ngl", "--n-gpu-layers", "--gpu-layers"), "n_gpu_layers", int)
_value(("-t", "--threads"), "threads", int)
_value(("-tb", "--threads-batch"), "threads_batch", int)
_value(("-b", "--batch-size"), "batch_size", int)
_value(("-ub", "--ubatch-size"), "ubatch_size", int)
_value(("-n", "--n-predict", "--predict"), "n_predict", int)
_value(("--temp",), "temperature", float)
_value(("--top-k",), "top_k", int)
_value(("--top-p",), "top_p", float)
_value(("--min-p",), "min_p", float)
_value(("--repeat-penalty",), "repeat_penalty", float)
_value(("--repeat-last-n",), "repeat_last_n", int)
_value(("--presence-penalty",), "presence_penalty", float)
_value(("--frequency-penalty",), "frequency_penalty", float)
_value(("--typical",), "typical_p", float)
_value(("--mirostat",), "mirostat", int)
_value(("--mirostat-ent",), "mirostat_tau", float)
_value(("--mirostat-lr",), "mirostat_eta", float)
_value(("-s", "--seed"), "seed", int)
_value(("-fa", "--flash-attn"), "flash_attn", str)
_value(("-ctk", "--cache-type-k"), "cache_type_k", str)
_value(("-ctv", "--cache-type-v"), "cache_type_v", str)
_value(("--draft-max", "--draft", "--draft-n"), "draft_max", int)
_value(("--draft-p-min",), "draft_p_min", float)
_value(("-cram", "--cache-ram"), "cache_ram", int)
_value(("--burst-gap-ms",), "burst_gap_ms", float)
_value(("--batch-share",), "batch_share", int)
_value(("--reasoning-budget",), "reasoning_budget", int)
_value(("--chat-template-file",), "chat_template_file", str)
_value(("-a", "--alias"), "alias", str)
_switch(("--metrics",), "metrics", True)
_switch(("--no-metrics",), "metrics", False)
_switch(("--mmap",), "mmap", True)
_switch(("--no-mmap",), "mmap", False)
_switch(("--mlock",), "mlock", True)
_switch(("--jinja",), "jinja", True)
_switch(("--no-jinja",), "jinja", False)
_switch(("--cont-batching", "-cb"), "cont_batching", True)
_switch(("--adaptive-slots",), "adaptive_slots", True)
_switch(("--no-adaptive-slots",), "adaptive_slots", False)

# What `/engines/_configure` may pass (runtime flags); paths never come this way.
ALLOWED_RUNTIME_FLAGS = frozenset(
    {
        name
        for name in (*_VALUE_FLAGS, *_SWITCHES)
        if name not in {"--chat-template-file", "-a", "--alias"}
    }
)

# Switches whose default, None, leaves the choice to the engine or the runner.
_UNDECIDED_SWITCHES = frozenset({"mmap"})

FLASH_ATTN_VALUES = {"on": 1, "off": 0, "auto": -1}
CACHE_TYPES = {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"}


@dataclass(frozen=True)
class WorkerSettings:
    """How one runner loads and serves its model. `None` means the runner decides."""

    ctx_size: int | None = None  # tokens per slot; the context holds ctx_size * parallel
    parallel: int = 8
    n_gpu_layers: int = 0
    threads: int | None = None
    threads_batch: int | None = None
    batch_size: int = 512
    ubatch_size: int = 512
    n_predict: int = -1
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    typical_p: float = 1.0
    mirostat: int = 0  # 1, 2: Mirostat's version, in place of top-k/top-p/min-p
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: int = -1
    flash_attn: str = "auto"
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    draft_max: int = 16
    draft_p_min: float = 0.75
    # MiB of host memory for prompts whose slot was taken (llama-server's --cache-ram);
    # 0 turns it off. Counted in the memory estimate.
    cache_ram: int = 256
    # dmr's own: how long an idle runner waits for the next request of a burst
    # before its first step (runner/batching.py); 0 starts at once.
    burst_gap_ms: float = 3.0
    # dmr's own: how many batch requests (x-dmr-priority: batch) may be decoded in a
    # step that holds an interactive request; -1 no limit. None: 0 on CPU, where each
    # sequence adds to a step's time, no limit with GPU layers (docs/batch.md).
    batch_share: int | None = None
    # dmr's own: let requests into the `parallel` slots only as far as the measured step
    # cost says a bigger batch pays, from 8 up (runner/slot_limit.py). The engine turns
    # it on with the slots it sized by memory when nobody set `--parallel`.
    adaptive_slots: bool = False
    # llama-server's: thinking tokens a reasoning model may write (-1 unlimited, 0 none).
    reasoning_budget: int = -1
    chat_template_file: str | None = None
    alias: str | None = None
    metrics: bool = True
    # Map the GGUF file (True) or read the weights into the runner's own memory (False).
    # None: the engine decides, reading them into huge pages on the CPU (huge_pages.py).
    mmap: bool | None = None
    mlock: bool = False
    jinja: bool = True
    cont_batching: bool = True
    extra: tuple[str, ...] = field(default=())  # native llama-server only

    def to_argv(self) -> list[str]:
        """The runner's command-line options for every setting that differs from the default."""
        default = WorkerSettings()
        argv: list[str] = []
        for item in fields(self):
            if item.name in {"extra", "jinja", "cont_batching"}:
                continue
            value = getattr(self, item.name)
            if value == getattr(default, item.name) or value is None:
                continue
            option = "--" + item.name.replace("_", "-")
            if isinstance(value, bool):
                argv.append(option if value else "--no-" + item.name.replace("_", "-"))
            else:
                argv.extend([option, str(value)])
        return argv


def _split_flags(flags: Sequence[str]) -> list[tuple[str, str | None]]:
    """[("--ctx-size", "2048"), ("--metrics", None)]: `--name=value` and `--name value` forms."""
    pairs: list[tuple[str, str | None]] = []
    index = 0
    while index < len(flags):
        token = flags[index]
        index += 1
        if not token.startswith("-"):
            raise ValueError(f"unexpected argument {token!r} (expected a flag)")
        name, sep, inline = token.partition("=")
        if name in FORBIDDEN_LLAMA_ARGS:
            raise ValueError(f"flag {name} may not be set: dmr sets it for the runner")
        if sep:
            pairs.append((name, inline))
        elif name in _VALUE_FLAGS:
            if index >= len(flags):
                raise ValueError(f"flag {name} needs a value")
            pairs.append((name, flags[index]))
            index += 1
        elif name in _SWITCHES:
            pairs.append((name, None))
        else:
            # Unknown to the Python runner; the native llama-server may still know it.
            value: str | None = None
            if index < len(flags) and not flags[index].startswith("-"):
                value = flags[index]
                index += 1
            pairs.append((name, value))
    return pairs


def _convert(name: str, raw: str) -> Any:
    attr, kind = _VALUE_FLAGS[name]
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"flag {name} expects {kind.__name__}, got {raw!r}") from None
    if attr == "flash_attn" and value not in FLASH_ATTN_VALUES:
        raise ValueError(f"flag {name} expects on, off or auto, got {raw!r}")
    if attr in {"cache_type_k", "cache_type_v"} and value not in CACHE_TYPES:
        raise ValueError(f"flag {name}: unknown cache type {raw!r}")
    if attr in {"ctx_size", "parallel", "batch_size", "ubatch_size"} and value <= 0:
        raise ValueError(f"flag {name} must be positive, got {raw!r}")
    if attr == "burst_gap_ms" and not 0 <= value <= 1000:
        raise ValueError(f"flag {name} takes 0 to 1000 ms, got {raw!r}")
    if attr == "batch_share" and value < -1:
        raise ValueError(f"flag {name} takes -1 (no limit) or a number of requests")
    if attr == "reasoning_budget" and value < -1:
        raise ValueError(f"flag {name} takes -1 (unlimited), 0 (off) or a token count")
    if attr == "cache_ram" and value < 0:
        raise ValueError(f"flag {name} takes MiB, 0 to turn the cache off; got {raw!r}")
    return value


def apply_flags(
    settings: WorkerSettings,
    flags: Sequence[str],
    *,
    allowed: frozenset[str] | None = None,
    allow_unknown: bool = False,
) -> WorkerSettings:
    """`settings` with `flags` applied; `allowed` limits which flags may appear at all."""
    changes: dict[str, Any] = {}
    extra: list[str] = list(settings.extra)
    for name, raw in _split_flags(flags):
        if allowed is not None and name not in allowed:
            raise ValueError(f"runtime flag {name} is not allowed for llama.cpp")
        if name in _SWITCHES:
            if raw is not None:
                raise ValueError(f"flag {name} takes no value")
            attr, switch_value = _SWITCHES[name]
            changes[attr] = switch_value
        elif name in _VALUE_FLAGS:
            assert raw is not None
            changes[_VALUE_FLAGS[name][0]] = _convert(name, raw)
        elif allow_unknown:
            extra.extend([name] if raw is None else [name, raw])
        else:
            raise ValueError(f"flag {name} is not supported by the llama-cpp-python runner")
    return replace(settings, extra=tuple(extra), **changes)


def sets_parallel(flags: Sequence[str]) -> bool:
    """Whether `flags` choose the slot count (then the engine does not size it)."""
    return any(name in {"-np", "--parallel"} for name, _ in _split_flags(flags))


def parse_llama_args(text: str, *, allow_unknown: bool = False) -> list[str]:
    """Split `LLAMA_ARGS` and reject the flags dmr owns (model, host, port, embeddings, mmproj)."""
    flags = shlex.split(text)
    apply_flags(WorkerSettings(), flags, allow_unknown=True)  # raises on forbidden flags
    if not allow_unknown:
        apply_flags(WorkerSettings(), flags)
    return flags


def split_known_flags(flags: Sequence[str]) -> tuple[list[str], list[str]]:
    """(flags the Python runner honours, llama-server flags it has no use for).

    DMR users write `LLAMA_ARGS` for llama-server (`--verbose --jinja -ngl 999`); a
    flag the Python runner cannot honour is no reason to refuse the model.
    """
    known: list[str] = []
    unknown: list[str] = []
    for name, raw in _split_flags(flags):
        where = known if name in _VALUE_FLAGS or name in _SWITCHES else unknown
        where.extend([name] if raw is None else [f"{name}={raw}"])
    return known, unknown


def parse_runtime_flags(flags: Sequence[str]) -> list[str]:
    """Check `_configure` runtime flags: allow-list only, no path separators in values."""
    for token in flags:
        if "/" in token or "\\" in token:
            raise ValueError(f"runtime flag value {token!r} may not contain '/' or '\\'")
    apply_flags(WorkerSettings(), flags, allowed=ALLOWED_RUNTIME_FLAGS)
    return list(flags)


def runner_arg_parser() -> argparse.ArgumentParser:
    """The runner's own command line: the files and socket, then every worker setting."""
    parser = argparse.ArgumentParser(prog="python -m dmr_llamacpp.runner")
    parser.add_argument("--model", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--mode", default="completion")
    parser.add_argument("--mmproj")
    parser.add_argument("--model-draft")
    parser.add_argument("--served-model-name")
    # Where prompt caches outlive the runner (the store's folder for this model), and
    # the cap on all of them (runner/prompt_files.py); 0 keeps nothing on disk.
    parser.add_argument("--prompt-cache-dir")
    parser.add_argument("--prompt-cache-max-bytes", type=int, default=0)
    default = WorkerSettings()
    for item in fields(WorkerSettings):
        if item.name in {"extra", "jinja", "cont_batching"}:
            continue
        option = "--" + item.name.replace("_", "-")
        value = getattr(default, item.name)
        if isinstance(value, bool) or item.name in _UNDECIDED_SWITCHES:
            parser.add_argument(option, dest=item.name, action="store_true", default=value)
            parser.add_argument(
                "--no-" + item.name.replace("_", "-"), dest=item.name, action="store_false"
            )
        else:
            kind = {"ctx_size": int, "threads": int, "threads_batch": int, "batch_share": int}.get(
                item.name, type(value) if value is not None else str
            )
            parser.add_argument(option, dest=item.name, type=kind, default=value)
    return parser


def settings_from_namespace(namespace: argparse.Namespace) -> WorkerSettings:
    values = {
        item.name: getattr(namespace, item.name)
        for item in fields(WorkerSettings)
        if hasattr(namespace, item.name)
    }
    return WorkerSettings(**values)
