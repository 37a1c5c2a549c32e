"""The engine side (runs in `dmr serve`): command line, flags, memory estimate."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from dmr.plugins import engines
from dmr.records import AcceleratorInfo, EngineState, Mode, RunnerLaunch
from dmr_llamacpp import engine as engine_module
from dmr_llamacpp.engine import LlamaCppEngine, weights_placement
from dmr_llamacpp.huge_pages import huge_page_env, huge_pages_available
from dmr_llamacpp.settings import WorkerSettings, apply_flags
from llamacpp_helpers import CPU, make_launch

pytestmark = pytest.mark.llama

GPU = AcceleratorInfo(
    name="NVIDIA H100", kind="cuda", index=0, total_memory=80 << 30, free_memory=80 << 30
)


def test_plugin_registers_the_engine() -> None:
    spec = next(spec for spec in engines() if spec.name == "llama.cpp")
    assert spec.formats == frozenset({"gguf"})
    assert spec.modes == frozenset({Mode.COMPLETION, Mode.EMBEDDING, Mode.RERANKING})
    assert "--ctx-size" in spec.allowed_flags and "--model" not in spec.allowed_flags
    assert spec.engine.status().state is EngineState.RUNNING
    assert spec.engine.status().render().startswith("Running: llama-cpp-python ")


def test_server_side_never_imports_llama_cpp(llama_bundle: Path) -> None:
    code = (
        "import sys; from pathlib import Path\n"
        "from dmr.plugins import engines\n"
        "from dmr_llamacpp.engine import LlamaCppEngine\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from llamacpp_helpers import make_launch\n"
        f"launch = make_launch(Path({str(llama_bundle)!r}), Path('/tmp/x.sock'))\n"
        "engines(); e = LlamaCppEngine(); e.status(); e.runner_command(launch)\n"
        "e.estimate_memory(launch)\n"
        "assert 'llama_cpp' not in sys.modules, 'llama_cpp imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_runner_command_cpu(llama_bundle: Path, tmp_path: Path) -> None:
    launch = make_launch(llama_bundle, tmp_path / "r.sock", context_size=2048, parallel=4)
    argv = list(LlamaCppEngine().runner_command(launch).argv)
    assert argv[:3] == [sys.executable, "-m", "dmr_llamacpp.runner"]
    assert argv[argv.index("--model") + 1] == str(llama_bundle / "model" / "model.gguf")
    assert argv[argv.index("--socket") + 1] == str(tmp_path / "r.sock")
    assert argv[argv.index("--mode") + 1] == "completion"
    assert argv[argv.index("--ctx-size") + 1] == "2048"
    assert argv[argv.index("--parallel") + 1] == "4"
    assert argv[argv.index("--n-gpu-layers") + 1] == "0"


def test_draft_model_and_speculative_settings_reach_the_runner(
    llama_bundle: Path, tmp_path: Path
) -> None:
    launch = make_launch(llama_bundle, tmp_path / "r.sock")
    speculative = replace(
        launch,
        draft_bundle_dir=llama_bundle,
        config=replace(
            launch.config, speculative_num_tokens=4, speculative_min_acceptance_rate=0.5
        ),
    )
    argv = list(LlamaCppEngine().runner_command(speculative).argv)
    assert argv[argv.index("--model-draft") + 1] == str(llama_bundle / "model" / "model.gguf")
    assert argv[argv.index("--draft-max") + 1] == "4"
    assert argv[argv.index("--draft-p-min") + 1] == "0.5"
    # The draft's weights and KV cache count for admission.
    plain = LlamaCppEngine().estimate_memory(launch).total
    with_draft = LlamaCppEngine().estimate_memory(speculative).total
    assert with_draft > plain + (llama_bundle / "model" / "model.gguf").stat().st_size * 0.9
    embedding = replace(speculative, mode=Mode.EMBEDDING)
    with pytest.raises(ValueError, match="only applies to completion"):
        LlamaCppEngine().runner_command(embedding)


def test_runner_command_gpu_offloads_all_layers_and_uses_bundle_template(
    llama_bundle: Path, tmp_path: Path
) -> None:
    template = llama_bundle / "model" / "template.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    try:
        launch = make_launch(llama_bundle, tmp_path / "r.sock", mode=Mode.EMBEDDING, device=GPU)
        argv = list(LlamaCppEngine().runner_command(launch).argv)
    finally:
        template.unlink()
    assert argv[argv.index("--n-gpu-layers") + 1] == "999"
    assert argv[argv.index("--chat-template-file") + 1] == str(template)
    assert argv[argv.index("--mode") + 1] == "embedding"


@pytest.mark.parametrize(
    "llama_args",
    ["--model /x.gguf", "-m x", "--host 0.0.0.0", "--port 1", "--embeddings", "--mmproj p"],
)
def test_llama_args_forbidden_flags_are_rejected(
    llama_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, llama_args: str
) -> None:
    monkeypatch.setenv("LLAMA_ARGS", llama_args)
    flag = llama_args.split()[0]
    with pytest.raises(ValueError, match=flag):
        LlamaCppEngine().runner_command(make_launch(llama_bundle, tmp_path / "r.sock"))


def test_llama_args_replace_defaults(
    llama_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMA_ARGS", "-ngl 12 --temp 0.2 --threads 3")
    launch = make_launch(llama_bundle, tmp_path / "r.sock", device=GPU)
    argv = list(LlamaCppEngine().runner_command(launch).argv)
    assert argv[argv.index("--n-gpu-layers") + 1] == "12"
    assert argv[argv.index("--temperature") + 1] == "0.2"
    assert argv[argv.index("--threads") + 1] == "3"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--chat-template-file", "x"), "not allowed"),
        (("--threads", "a/b"), "may not contain"),
        (("--temp", "0\\1"), "may not contain"),
        (("--model", "m"), "--model"),
        (("--frobnicate",), "not allowed"),
        (("--burst-gap-ms", "-5"), "0 to 1000 ms"),
    ],
)
def test_runtime_flags_go_through_the_allow_list(
    llama_bundle: Path, tmp_path: Path, flags: tuple[str, ...], message: str
) -> None:
    launch = make_launch(llama_bundle, tmp_path / "r.sock", runtime_flags=flags)
    with pytest.raises(ValueError, match=message):
        LlamaCppEngine().runner_command(launch)


def test_runtime_flags_allowed_reach_the_runner(llama_bundle: Path, tmp_path: Path) -> None:
    launch = make_launch(llama_bundle, tmp_path / "r.sock", runtime_flags=("--top-k", "7"))
    argv = list(LlamaCppEngine().runner_command(launch).argv)
    assert argv[argv.index("--top-k") + 1] == "7"


def test_memory_estimate_grows_with_context_and_slots(llama_bundle: Path, tmp_path: Path) -> None:
    engine = LlamaCppEngine()
    sock = tmp_path / "r.sock"
    weights = (llama_bundle / "model" / "model.gguf").stat().st_size
    small = engine.estimate_memory(make_launch(llama_bundle, sock, context_size=1024, parallel=1))
    longer = engine.estimate_memory(make_launch(llama_bundle, sock, context_size=4096, parallel=1))
    wider = engine.estimate_memory(make_launch(llama_bundle, sock, context_size=1024, parallel=4))
    assert small.device_bytes > weights
    # SmolLM2: 30 layers x 3 KV heads x 64 dims x 2 (K, V) x 2 bytes = 23040 bytes a token.
    assert longer.device_bytes - small.device_bytes >= 3072 * 23040
    assert wider.device_bytes - small.device_bytes >= 3072 * 23040
    on_gpu = engine.estimate_memory(
        make_launch(llama_bundle, sock, context_size=1024, parallel=1, device=GPU)
    )
    assert on_gpu.device_bytes >= weights
    assert CPU.kind == "cpu"


def test_runner_exits_with_the_reason_when_the_model_cannot_load(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dmr_llamacpp.runner",
            "--model",
            str(broken),
            "--socket",
            str(tmp_path / "r.sock"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "failed to load broken.gguf" in result.stderr


def test_llama_server_path_finds_upstream_and_docker_names(tmp_path: Path) -> None:
    from dmr_llamacpp.engine import find_llama_server

    def executable(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
        return path

    assert find_llama_server(tmp_path / "missing") is None
    assert find_llama_server(tmp_path) is None
    docker = executable(tmp_path / "a" / "com.docker.llama-server")
    assert find_llama_server(tmp_path / "a") == docker
    upstream = executable(tmp_path / "a" / "llama-server")
    assert find_llama_server(tmp_path / "a") == upstream  # DMR prefers the upstream name
    in_bin = executable(tmp_path / "b" / "bin" / "llama-server")
    assert find_llama_server(tmp_path / "b") == in_bin
    built = executable(
        tmp_path / "c" / "com.docker.llama-server.native.linux.cuda12.amd64" / "bin"
        / "com.docker.llama-server"
    )  # fmt: skip
    assert find_llama_server(tmp_path / "c") == built
    assert find_llama_server(built) == built
    not_executable = tmp_path / "d" / "llama-server"
    not_executable.parent.mkdir()
    not_executable.write_text("")
    assert find_llama_server(tmp_path / "d") is None


def test_reasoning_budget_reaches_the_runner(llama_bundle: Path, tmp_path: Path) -> None:
    """`_configure`'s `llamacpp.reasoning-budget` (`dmr configure --reasoning-budget`)
    and the `--reasoning-budget` runtime flag both become the runner's option."""
    launch = make_launch(llama_bundle, tmp_path / "r.sock")
    configured = replace(
        launch,
        config=replace(launch.config, engine_options={"llamacpp": {"reasoning-budget": 0}}),
    )
    argv = list(LlamaCppEngine().runner_command(configured).argv)
    assert argv[argv.index("--reasoning-budget") + 1] == "0"
    flagged = make_launch(
        llama_bundle, tmp_path / "r.sock", runtime_flags=("--reasoning-budget", "64")
    )
    argv = list(LlamaCppEngine().runner_command(flagged).argv)
    assert argv[argv.index("--reasoning-budget") + 1] == "64"
    assert "--reasoning-budget" not in LlamaCppEngine().runner_command(launch).argv
    bad = make_launch(llama_bundle, tmp_path / "r.sock", runtime_flags=("--reasoning-budget", "-5"))
    with pytest.raises(ValueError, match="reasoning-budget"):
        LlamaCppEngine().runner_command(bad)


def _ctx(engine: LlamaCppEngine, launch: RunnerLaunch) -> int:
    argv = list(engine.runner_command(launch).argv)
    return int(argv[argv.index("--ctx-size") + 1])


def test_default_context_is_the_trained_one_where_memory_allows(
    llama_bundle: Path, tmp_path: Path
) -> None:
    """SmolLM2 is trained on 8192 tokens: 8 slots of it fit half of 16 GiB, not of 2 GiB."""
    engine = LlamaCppEngine()
    unset = make_launch(llama_bundle, tmp_path / "r.sock", context_size=None)
    roomy = replace(unset, memory_budget=16 << 30)
    assert _ctx(engine, roomy) == 8192
    sized = make_launch(llama_bundle, tmp_path / "r.sock", context_size=8192)
    # The estimate admission compares is the one of the context chosen.
    assert engine.estimate_memory(roomy) == engine.estimate_memory(sized)
    assert engine.estimate_memory(roomy).device_bytes <= (16 << 30) // 2

    tight = replace(unset, memory_budget=2 << 30)
    assert _ctx(engine, tight) == 4096  # never below 4096, however tight
    assert engine.estimate_memory(tight).device_bytes < engine.estimate_memory(roomy).device_bytes
    # Without a budget, the device's free memory (8 GiB here) is the measure.
    assert _ctx(engine, unset) == 8192
    # Set contexts and pooling runners are left alone.
    assert _ctx(engine, replace(sized, memory_budget=1 << 30)) == 8192
    embedding = make_launch(llama_bundle, tmp_path / "r.sock", Mode.EMBEDDING, context_size=None)
    assert _ctx(engine, replace(embedding, memory_budget=16 << 30)) == 4096


def test_completion_runners_get_the_store_folder_for_prompt_caches(
    llama_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "prompt-cache" / ("a" * 64)
    launch = replace(make_launch(llama_bundle, tmp_path / "r.sock"), prompt_cache_dir=folder)
    argv = list(LlamaCppEngine().runner_command(launch).argv)
    assert argv[argv.index("--prompt-cache-dir") + 1] == str(folder)
    assert argv[argv.index("--prompt-cache-max-bytes") + 1] == str(1024**3)
    monkeypatch.setenv("DMR_PROMPT_CACHE_MAX_BYTES", "5000000")
    argv = list(LlamaCppEngine().runner_command(launch).argv)
    assert argv[argv.index("--prompt-cache-max-bytes") + 1] == "5000000"
    # Embeddings keep no prompts; a cap of 0 keeps none on disk.
    embedding = replace(launch, mode=Mode.EMBEDDING)
    assert "--prompt-cache-dir" not in LlamaCppEngine().runner_command(embedding).argv
    monkeypatch.setenv("DMR_PROMPT_CACHE_MAX_BYTES", "0")
    assert "--prompt-cache-dir" not in LlamaCppEngine().runner_command(launch).argv
    monkeypatch.setenv("DMR_PROMPT_CACHE_MAX_BYTES", "1GB")
    with pytest.raises(ValueError, match="DMR_PROMPT_CACHE_MAX_BYTES='1GB': expected a number"):
        LlamaCppEngine().runner_command(launch)


def test_only_cpu_runners_on_default_threads_take_a_cpu_share(
    llama_bundle: Path, tmp_path: Path
) -> None:
    def shares(**options: object) -> bool:
        launch = make_launch(llama_bundle, tmp_path / "r.sock", **options)  # type: ignore[arg-type]
        return LlamaCppEngine().runner_command(launch).cpu_share

    assert shares()
    assert not shares(device=GPU)  # the GPU computes; its runner's threads only feed it
    assert not shares(runtime_flags=("--threads", "2"))  # set by hand: kept as set
    assert not shares(runtime_flags=("--threads-batch", "2"))


def _slots(engine: LlamaCppEngine, launch: RunnerLaunch) -> tuple[int, bool]:
    argv = list(engine.runner_command(launch).argv)
    return int(argv[argv.index("--parallel") + 1]), "--adaptive-slots" in argv


def test_slots_are_doubled_while_the_memory_free_for_dmr_allows(
    llama_bundle: Path, tmp_path: Path
) -> None:
    """Nobody set `--parallel`: 8 slots, doubled up to 32 while the whole estimate stays
    within a quarter of the device's memory and half of admission's budget, and the
    runner sizes what it lets in."""
    engine = LlamaCppEngine()
    big = replace(CPU, total_memory=64 << 30, free_memory=64 << 30)
    unset = make_launch(
        llama_bundle, tmp_path / "r.sock", context_size=4096, parallel=None, device=big
    )
    roomy = replace(unset, memory_budget=64 << 30)
    assert _slots(engine, roomy) == (32, True)
    # The estimate admission compares is the one of the slots chosen.
    fixed = make_launch(llama_bundle, tmp_path / "r.sock", context_size=4096, parallel=32)
    assert engine.estimate_memory(roomy) == engine.estimate_memory(fixed)
    assert engine.estimate_memory(roomy).device_bytes <= (64 << 30) // 4
    # SmolLM2 at 4096 tokens a slot: 16 slots' estimate is 2.15 GiB, 32 3.69 GiB.
    middle = replace(unset, memory_budget=6 << 30)
    assert _slots(engine, middle) == (16, True)
    tight = replace(unset, memory_budget=2 << 30)
    assert _slots(engine, tight) == (8, True)  # never below 8, however tight
    assert engine.estimate_memory(tight).device_bytes < engine.estimate_memory(middle).device_bytes
    # A device of 8 GiB: a quarter of it holds 8 slots, whatever is free. The count
    # does not follow the free memory from one start to the next (prompt caches' key).
    small = replace(big, total_memory=8 << 30)
    assert _slots(engine, replace(unset, device=small, memory_budget=64 << 30)) == (8, True)


def test_slots_set_by_anyone_are_kept(
    llama_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = LlamaCppEngine()
    set_by_configure = make_launch(llama_bundle, tmp_path / "r.sock", parallel=8)
    assert _slots(engine, replace(set_by_configure, memory_budget=64 << 30)) == (8, False)
    flagged = make_launch(
        llama_bundle, tmp_path / "r.sock", parallel=None, runtime_flags=("--parallel", "3")
    )
    assert _slots(engine, replace(flagged, memory_budget=64 << 30)) == (3, False)
    unset = make_launch(llama_bundle, tmp_path / "r.sock", parallel=None)
    monkeypatch.setenv("LLAMA_ARGS", "-np 2")
    assert _slots(engine, replace(unset, memory_budget=64 << 30)) == (2, False)
    monkeypatch.setenv("LLAMA_ARGS", "--no-adaptive-slots")
    assert _slots(engine, replace(unset, memory_budget=64 << 30)) == (8, False)
    monkeypatch.delenv("LLAMA_ARGS")
    embedding = make_launch(llama_bundle, tmp_path / "r.sock", Mode.EMBEDDING, parallel=None)
    assert "--adaptive-slots" not in engine.runner_command(embedding).argv


def test_a_hybrid_model_counts_kv_cells_only_for_the_layers_that_attend() -> None:
    """Granite 4.0 H's shape: 40 layers of which 4 attend, the rest Mamba-2; per-layer
    KV head counts list 0 for the recurrent ones. Counting all 40 layers at the
    largest count (as the estimate did) made its KV cache ten times too big, and the
    recurrent state, which every slot keeps whatever its length, was not counted."""
    from dmr_llamacpp.engine import kv_cache_bytes, recurrent_state_bytes
    from dmr_llamacpp.settings import WorkerSettings

    attending = {0, 10, 20, 30}
    hybrid: dict[str, object] = {
        "general.architecture": "granitehybrid",
        "granitehybrid.block_count": 40,
        "granitehybrid.embedding_length": 1536,
        "granitehybrid.attention.head_count": 12,
        "granitehybrid.attention.head_count_kv": [4 if i in attending else 0 for i in range(40)],
        "granitehybrid.ssm.inner_size": 3072,
        "granitehybrid.ssm.state_size": 128,
        "granitehybrid.ssm.conv_kernel": 4,
        "granitehybrid.ssm.group_count": 1,
    }
    settings = WorkerSettings()  # f16 K and V: 2 bytes an element
    head_dim = 1536 // 12
    assert kv_cache_bytes(hybrid, 1000, settings) == 1000 * 4 * 4 * 2 * head_dim * 2
    per_layer = 3 * (3072 + 2 * 128) + 3072 * 128
    assert recurrent_state_bytes(hybrid, 8) == 4 * per_layer * 36 * 8

    # A plain transformer: every layer attends, and there is no recurrent state.
    llama: dict[str, object] = {
        "general.architecture": "llama",
        "llama.block_count": 30,
        "llama.embedding_length": 576,
        "llama.attention.head_count": 9,
        "llama.attention.head_count_kv": 3,
    }
    assert kv_cache_bytes(llama, 1000, settings) == 1000 * 30 * 3 * 2 * 64 * 2
    assert recurrent_state_bytes(llama, 8) == 0


def test_a_mamba_model_has_no_kv_cache_and_a_state_per_slot() -> None:
    from dmr_llamacpp.engine import kv_cache_bytes, recurrent_state_bytes
    from dmr_llamacpp.settings import WorkerSettings

    mamba: dict[str, object] = {
        "general.architecture": "mamba",
        "mamba.block_count": 4,
        "mamba.embedding_length": 256,
        "mamba.attention.head_count": 0,
        "mamba.ssm.inner_size": 512,
        "mamba.ssm.state_size": 16,
        "mamba.ssm.conv_kernel": 4,
    }
    assert kv_cache_bytes(mamba, 100_000, WorkerSettings()) == 0
    assert recurrent_state_bytes(mamba, 2) == 4 * (3 * 512 + 512 * 16) * 4 * 2


def test_cpu_runners_read_the_weights_into_huge_pages(
    llama_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the host gives huge pages, a CPU runner loads without mmap and with glibc's
    huge-page tunable, keeping any tunable the user set; elsewhere it maps the file."""
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    monkeypatch.setattr(engine_module, "huge_pages_available", lambda: True)
    command = LlamaCppEngine().runner_command(make_launch(llama_bundle, tmp_path / "r.sock"))
    assert "--no-mmap" in command.argv and "--mmap" not in command.argv
    assert command.env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"

    monkeypatch.setattr(engine_module, "huge_pages_available", lambda: False)
    command = LlamaCppEngine().runner_command(make_launch(llama_bundle, tmp_path / "r.sock"))
    assert "--mmap" in command.argv and "--no-mmap" not in command.argv
    assert "GLIBC_TUNABLES" not in command.env


@pytest.mark.parametrize(
    ("device", "flags", "mapped", "tunable"),
    [
        (GPU, (), True, False),  # VRAM holds the weights: the file stays mapped
        (CPU, ("--mmap",), True, False),  # the user's choice stands
        (CPU, ("--no-mmap",), False, True),  # read into memory by choice: huge pages too
        (GPU, ("--n-gpu-layers", "0"), False, True),  # the CPU computes after all
    ],
)
def test_weights_placement_follows_the_device_and_the_user(
    device: AcceleratorInfo, flags: tuple[str, ...], mapped: bool, tunable: bool
) -> None:
    launch = make_launch(Path("/unused"), Path("/unused.sock"), device=device)
    settings = apply_flags(
        WorkerSettings(n_gpu_layers=999 if device.is_gpu else 0), flags, allowed=None
    )
    placed, env = weights_placement(launch, settings, huge_pages=True, environ={})
    assert placed.mmap is mapped
    assert env == ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"} if tunable else {})


def test_a_tunable_the_user_chose_for_huge_pages_stays_theirs() -> None:
    env = huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=1"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=1"}


@pytest.mark.parametrize(
    ("mode_text", "glibc", "available"),
    [
        ("always [madvise] never\n", (2, 36), True),
        ("[always] madvise never\n", (2, 35), True),
        ("always madvise [never]\n", (2, 36), False),  # the kernel gives none
        ("always [madvise] never\n", (2, 34), False),  # a glibc without the tunable
        (None, (2, 36), False),  # no transparent huge pages at all (not Linux, or off)
    ],
)
def test_huge_pages_need_the_kernel_and_glibc(
    tmp_path: Path, mode_text: str | None, glibc: tuple[int, int], available: bool
) -> None:
    mode = tmp_path / "enabled"
    if mode_text is not None:
        mode.write_text(mode_text)
    assert huge_pages_available(mode, glibc) is available
