"""`python -m dmr_llamacpp.runner --model M.gguf --socket S --mode completion ...`."""

# The batched Q4_1 kernel must be in the process's global scope before anything loads
# llama.cpp's libraries (runner/q4_1_gemm.py), so it loads before the imports below.
# ruff: noqa: E402
from __future__ import annotations

from dmr_llamacpp.runner.q4_1_gemm import activate, load_before_llama_cpp

Q4_1_KERNEL = load_before_llama_cpp()

import asyncio
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from dmr.sdk.runner import serve_runner

from dmr_llamacpp.runner.app import RunnerState, create_asgi
from dmr_llamacpp.settings import WorkerSettings, runner_arg_parser, settings_from_namespace
from dmr_llamacpp.threads import default_threads

if TYPE_CHECKING:
    from dmr_llamacpp.runner.batching import BatchedGenerator
    from dmr_llamacpp.runner.chat import ChatTemplate
    from dmr_llamacpp.runner.model import ContextOptions, LoadedModel
    from dmr_llamacpp.runner.prompt_files import PromptFiles
    from dmr_llamacpp.runner.speculative import Drafter
    from dmr_llamacpp.runner.vision import VisionProjector


# llama.cpp's ggml_type numbers for the KV cache types `--cache-type-k/-v` name.
CACHE_TYPES = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "q8_0": 8,
    "iq4_nl": 20,
    "bf16": 30,
}
FLASH_ATTN = {"on": 1, "off": 0, "auto": -1}


def load_into(
    state: RunnerState,
    model_path: Path,
    template_file: str | None,
    on_failure: Callable[[], None],
    draft_path: Path | None = None,
    mmproj_path: Path | None = None,
    prompt_cache: tuple[Path, int] | None = None,
) -> None:
    """Load the model, and its projector for a completion runner with `mmproj_path`
    (in a thread, so /health answers 503 meanwhile); a completion runner with a
    `prompt_cache` (folder, cap in bytes) reads back the prompts saved there."""
    from dmr_llamacpp.runner.model import silence_llama_logs
    from dmr_llamacpp.runner.pooling import Pooler

    settings = state.settings
    silence_llama_logs()
    try:
        options = context_options(state.mode, settings)
        model = load_model(model_path, options, state.mode, settings)
        state.template = chat_template(model, template_file)
        if state.mode == "completion":
            drafter = None
            if draft_path is not None:
                drafter = load_drafter(draft_path, model, options, settings)
            if mmproj_path is not None:
                state.projector = load_projector(
                    mmproj_path, model, options.threads_batch, settings
                )
            saved = prompt_files(prompt_cache, model_path, options, settings)
            state.generator = start_generator(
                model, options, settings, drafter, state.projector, saved
            )
        else:
            state.pooler = Pooler(
                model, rank_head=state.mode == "reranking" and model.n_cls_out > 0
            )
        state.created = int(time.time())
        state.model = model
    except Exception as error:
        state.load_error = f"failed to load {model_path.name}: {error}"
        print(state.load_error, file=sys.stderr, flush=True)
        on_failure()  # exit, so the scheduler sees a crash with this message on stderr


def context_options(mode: str, settings: WorkerSettings) -> ContextOptions:
    """The llama context for `mode`: a generation runner's holds `parallel` slots of
    `ctx_size` tokens each; a pooling runner's takes each input whole."""
    import llama_cpp

    from dmr_llamacpp.runner.model import ContextOptions

    # llama.cpp's own defaults (llama-server's): a thread per physical core for
    # every step, one-token or batched (docs/benchmarks.md has the measurements).
    threads = settings.threads or default_threads()
    threads_batch = settings.threads_batch or threads
    ctx_per_slot = settings.ctx_size or 4096
    flash = FLASH_ATTN[settings.flash_attn]
    if mode == "completion":
        return ContextOptions(
            n_ctx=ctx_per_slot * settings.parallel,
            n_batch=settings.batch_size,
            n_ubatch=min(settings.ubatch_size, settings.batch_size),
            n_seq_max=settings.parallel,
            threads=threads,
            threads_batch=threads_batch,
            flash_attn=flash,
            type_k=CACHE_TYPES[settings.cache_type_k],
            type_v=CACHE_TYPES[settings.cache_type_v],
            kv_unified=False,
        )
    # Pooling needs each input whole in one micro-batch.
    return ContextOptions(
        n_ctx=ctx_per_slot,
        n_batch=ctx_per_slot,
        n_ubatch=ctx_per_slot,
        n_seq_max=min(settings.parallel, 64),
        threads=threads,
        threads_batch=threads_batch,
        embeddings=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        flash_attn=flash,
    )


def load_model(
    model_path: Path, options: ContextOptions, mode: str, settings: WorkerSettings
) -> LoadedModel:
    """The model's weights and context; a reranking runner's model with a classifier
    head is loaded again with rank pooling."""
    import llama_cpp

    from dmr_llamacpp.runner.model import ContextOptions, LoadedModel

    model = LoadedModel(
        model_path,
        options,
        n_gpu_layers=settings.n_gpu_layers,
        use_mmap=settings.mmap is not False,  # None (started by hand): llama.cpp's default
        use_mlock=settings.mlock,
    )
    if mode == "reranking" and model.n_cls_out > 0:
        model.close()
        options = ContextOptions(
            **{**options.__dict__, "pooling_type": llama_cpp.LLAMA_POOLING_TYPE_RANK}
        )
        model = LoadedModel(model_path, options, n_gpu_layers=settings.n_gpu_layers)
    if yields_busy_cores(settings):
        from dmr_llamacpp.runner.free_cores import FreeCores

        model.free_cores = FreeCores.for_this_process()
    return model


def yields_busy_cores(settings: WorkerSettings, env: Mapping[str, str] = os.environ) -> bool:
    """Whether the runner computes with fewer threads while other processes keep cores
    busy (runner/free_cores.py): on the CPU, with the thread counts left to it, unless
    `DMR_FREE_CORES=0` (or `DMR_CPU_SHARE=0`, every runner at its own count) says no."""
    off = any(
        env.get(name, "1").strip().lower() in ("0", "false", "no")
        for name in ("DMR_FREE_CORES", "DMR_CPU_SHARE")
    )
    return (
        not off
        and settings.n_gpu_layers == 0
        and settings.threads is None
        and settings.threads_batch is None
    )


def chat_template(model: LoadedModel, template_file: str | None) -> ChatTemplate:
    """The packaged template file when there is one, else the GGUF's own."""
    from dmr_llamacpp.runner.chat import ChatTemplate

    template_source = Path(template_file).read_text() if template_file else model.chat_template
    return ChatTemplate(
        template_source,
        bos_token=model.token_text(model.bos_token) if model.bos_token >= 0 else "",
        eos_token=model.token_text(model.eos_token) if model.eos_token >= 0 else "",
    )


def load_drafter(
    draft_path: Path, model: LoadedModel, options: ContextOptions, settings: WorkerSettings
) -> Drafter:
    """The speculative draft model, which must share the model's vocabulary."""
    from dmr_llamacpp.runner.model import LoadedModel
    from dmr_llamacpp.runner.speculative import Drafter

    if not model.can_cut_cache:
        # Rejected draft tokens are cut from the cache after every step.
        raise ValueError(
            "speculative decoding (--model-draft) needs a model whose cache can drop "
            "rejected tokens; this model is recurrent or hybrid, and its cache cannot"
        )
    draft = LoadedModel(draft_path, options, n_gpu_layers=settings.n_gpu_layers)
    if not draft.can_cut_cache:
        draft.close()
        raise ValueError(
            f"the draft model {draft_path.name} is recurrent or hybrid: its cache cannot "
            "drop rejected tokens, so it cannot draft"
        )
    if draft.n_vocab != model.n_vocab:
        draft.close()
        raise ValueError(
            f"the draft model {draft_path.name} has {draft.n_vocab} tokens in its "
            f"vocabulary and the model {model.n_vocab}; they must share one"
        )
    return Drafter(draft, max_tokens=settings.draft_max, p_min=settings.draft_p_min)


def start_generator(
    model: LoadedModel,
    options: ContextOptions,
    settings: WorkerSettings,
    drafter: Drafter | None,
    projector: VisionProjector | None,
    saved_prompts: PromptFiles | None,
) -> BatchedGenerator:
    """The completion runner's decode loop over its `parallel` slots."""
    from dmr_llamacpp.runner.batching import BatchedGenerator

    return BatchedGenerator(
        model,
        n_parallel=settings.parallel,
        ctx_per_slot=options.n_ctx // options.n_seq_max,
        drafter=drafter,
        host_cache_bytes=settings.cache_ram * 1024 * 1024,
        burst_gap_s=settings.burst_gap_ms / 1000,
        projector=projector,
        batch_share=batch_share(settings),
        prompt_files=saved_prompts,
        adaptive_slots=settings.adaptive_slots,
    )


def prompt_files(
    prompt_cache: tuple[Path, int] | None,
    model_path: Path,
    options: ContextOptions,
    settings: WorkerSettings,
) -> PromptFiles | None:
    """The saved prompts of this model and of runners set up as this one (None: none
    kept). The key holds what the cells depend on: another llama.cpp, context shape,
    cache types, attention kernel or device computes or lays out other cells."""
    import llama_cpp

    from dmr_llamacpp.runner.prompt_files import CacheKey, PromptFiles

    if prompt_cache is None or prompt_cache[1] <= 0:
        return None
    folder, max_bytes = prompt_cache
    key = CacheKey(
        llama_cpp_version=llama_cpp.__version__,
        model_file=f"{model_path.name}:{model_path.stat().st_size}",
        ctx_per_slot=options.n_ctx // options.n_seq_max,
        parallel=options.n_seq_max,
        n_batch=options.n_batch,
        n_ubatch=options.n_ubatch,
        cache_type_k=settings.cache_type_k,
        cache_type_v=settings.cache_type_v,
        flash_attn=settings.flash_attn,
        n_gpu_layers=settings.n_gpu_layers,
    )
    return PromptFiles(folder, key, max_bytes)


def batch_share(settings: WorkerSettings) -> int:
    """How many batch requests may share a step with an interactive one (-1: all).

    On CPU a step's time grows with each sequence in it (SmolLM2 on 2 cores: 19 ms
    for one, 82 ms for eight, docs/benchmarks.md), so a batch request decoded beside
    a chat slows the chat: batch requests wait in their slots until it is done. With GPU
    layers extra sequences cost little, and batch work shares every step.
    """
    if settings.batch_share is not None:
        return settings.batch_share
    return 0 if settings.n_gpu_layers == 0 else -1


def load_projector(
    path: Path, model: LoadedModel, threads: int, settings: WorkerSettings
) -> VisionProjector:
    """The model's projector, with a media marker of its own: a fixed one (libmtmd's
    `<__media__>`) typed into a message's text would be taken for an image."""
    from dmr_llamacpp.runner.vision import VisionProjector, set_mtmd_log_callback

    set_mtmd_log_callback()  # warnings and errors only, as for llama.cpp's own log
    return VisionProjector(
        path,
        model.model,
        n_threads=threads,
        use_gpu=settings.n_gpu_layers != 0,
        flash_attn_type=model.options.flash_attn,
        media_marker=f"<__media_{secrets.token_hex(8)}__>",
    )


def log_to_stderr() -> None:
    """The runner's own log lines (a truncated prompt) go to its output, which the
    server keeps as the runner's log (`dmr logs`); other libraries' stay silent."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    package = logging.getLogger("dmr_llamacpp")
    package.addHandler(handler)
    package.setLevel(logging.INFO)


async def main_async(argv: list[str] | None = None) -> None:
    log_to_stderr()
    logging.getLogger("dmr_llamacpp").info("batched Q4_1 kernel: %s", activate(Q4_1_KERNEL).status)
    args = runner_arg_parser().parse_args(argv)
    settings: WorkerSettings = settings_from_namespace(args)
    model_path = Path(args.model)
    state = RunnerState(
        model_name=args.served_model_name or settings.alias or model_path.stem,
        mode=args.mode,
        settings=settings,
    )
    app = create_asgi(state)

    def load(fail: Callable[[], None]) -> None:
        draft = Path(args.model_draft) if args.model_draft else None
        mmproj = Path(args.mmproj) if args.mmproj and args.mode == "completion" else None
        saved = (
            (Path(args.prompt_cache_dir), args.prompt_cache_max_bytes)
            if args.prompt_cache_dir
            else None
        )
        load_into(state, model_path, settings.chat_template_file, fail, draft, mmproj, saved)

    try:
        await serve_runner(app, Path(args.socket), load)
    finally:
        if state.generator is not None:
            state.generator.close()
        if state.projector is not None:
            state.projector.close()
    if state.load_error:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    asyncio.run(main_async(argv))


if __name__ == "__main__":
    main()
