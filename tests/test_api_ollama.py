"""The Ollama dialect against a live server and SmolLM2, through the official `ollama` client."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import ollama
import openai
import pytest

from tests.fixtures.server import DmrServer

pytestmark = [pytest.mark.llama, pytest.mark.xdist_group("smollm2")]

HI = [{"role": "user", "content": "Say hello."}]
SHORT = {"num_predict": 8, "temperature": 0, "seed": 1}


@pytest.fixture(scope="module")
def client(api_server: DmrServer) -> ollama.Client:
    return ollama.Client(host=api_server.url)


def test_version_list_show(client: ollama.Client, api_server: DmrServer) -> None:
    with api_server.client() as http:
        assert http.get("/api/version").json()["version"]
    models = {m.model: m for m in client.list().models}
    assert "ai/smollm2:latest" in models
    smollm2 = models["ai/smollm2:latest"]
    assert smollm2.size and smollm2.size > 50_000_000
    assert smollm2.details and smollm2.details.family == "llama"
    shown = client.show("smollm2")
    assert shown.template and "im_start" in shown.template
    assert shown.modelinfo and shown.modelinfo["general.architecture"] == "llama"
    assert "completion" in (shown.capabilities or [])


@pytest.mark.parametrize("name", ["smollm2", "smollm2:latest", "ai/smollm2"])
def test_chat(client: ollama.Client, name: str) -> None:
    reply = client.chat(model=name, messages=HI, options=SHORT)
    assert reply.message.role == "assistant" and reply.message.content
    assert reply.done and reply.done_reason in ("stop", "length")
    assert reply.prompt_eval_count and reply.prompt_eval_count > 0
    assert reply.eval_count and 0 < reply.eval_count <= 8
    assert reply.eval_duration and reply.eval_duration > 0
    assert reply.total_duration and reply.total_duration >= reply.eval_duration


def test_chat_stream(client: ollama.Client) -> None:
    parts = list(client.chat(model="smollm2", messages=HI, options=SHORT, stream=True))
    assert len(parts) > 2
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content or "" for p in parts)
    assert parts[-1].eval_count and parts[-1].total_duration


def test_chat_format_schema(client: ollama.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string"}},
        "required": ["colour"],
        "additionalProperties": False,
    }
    reply = client.chat(
        model="smollm2",
        format=schema,
        options={"num_predict": 32, "temperature": 0},
        messages=[{"role": "user", "content": "Name a colour as JSON."}],
    )
    jsonschema.validate(json.loads(reply.message.content or ""), schema)


def test_generate_and_load_unload(client: ollama.Client, api_server: DmrServer) -> None:
    reply = client.generate(model="smollm2", prompt="1, 2, 3,", options=SHORT)
    assert reply.response and reply.done
    raw = client.generate(
        model="smollm2", prompt="<|im_start|>user\nHi<|im_end|>\n", raw=True, options=SHORT
    )
    assert raw.done
    assert client.generate(model="smollm2").done_reason == "load"
    running = client.ps().models
    assert any(m.model and "smollm2" in m.model for m in running)
    assert all(m.expires_at is not None for m in running)
    assert client.generate(model="smollm2", keep_alive=0).done_reason == "unload"
    with api_server.client() as http:
        names = [
            item["model_name"]
            for item in http.get("/engines/ps").json()
            if item["mode"] == "completion"
        ]
    assert "smollm2" not in names


def test_embed(client: ollama.Client) -> None:
    result = client.embed(model="smollm2", input=["hello", "world wide web"])
    assert len(result.embeddings) == 2
    assert len(result.embeddings[0]) == len(result.embeddings[1]) > 0
    legacy = client.embeddings(model="smollm2", prompt="hello")
    assert len(legacy.embedding) == len(result.embeddings[0])


def test_copy_and_delete(client: ollama.Client) -> None:
    client.copy("smollm2", "smollm2-copy:v1")
    assert "ai/smollm2-copy:v1" in {m.model for m in client.list().models}
    client.delete("smollm2-copy:v1")
    names = {m.model for m in client.list().models}
    assert "ai/smollm2-copy:v1" not in names and "ai/smollm2:latest" in names
    with pytest.raises(ollama.ResponseError) as caught:
        client.delete("smollm2-copy:v1")
    assert caught.value.status_code == 404


def test_create_from_blob(client: ollama.Client, smollm2_gguf: Path) -> None:
    digest = client.create_blob(smollm2_gguf)
    progress = client.create(
        model="pirate",
        files={"model.gguf": digest},
        system="You are a pirate.",
        parameters={"temperature": 0.1, "num_predict": 8},
    )
    assert progress.status == "success"
    shown = client.show("pirate")
    assert 'SYSTEM """You are a pirate."""' in (shown.modelfile or "")
    assert shown.details and shown.details.quantization_level == "Q4_1"
    reply = client.chat(model="pirate", messages=HI)
    assert reply.message.content and reply.eval_count and reply.eval_count <= 8
    client.delete("pirate")


# Not ChatML (SmolLM2's own template), so the prompt only matches if this one is used.
GO_TEMPLATE = (
    "{{ if .System }}### System: {{ .System }}\n{{ end }}"
    "### User: {{ .Prompt }}\n### Assistant: {{ .Response }}"
)


def test_create_with_a_go_template(client: ollama.Client) -> None:
    """Ollama clients write Go templates; the runner must render what Ollama would."""
    progress = client.create(model="go-template", from_="smollm2", template=GO_TEMPLATE)
    assert progress.status == "success"
    try:
        assert client.show("go-template").template == GO_TEMPLATE
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
        ]
        chat = client.chat(model="go-template", messages=messages, options={"num_predict": 1})
        # What Go's text/template renders for this template and conversation.
        rendered = "### System: Be brief.\n### User: Name a colour.\n### Assistant: "
        raw = client.generate(
            model="go-template", prompt=rendered, raw=True, options={"num_predict": 1}
        )
        assert chat.prompt_eval_count == raw.prompt_eval_count
        base = client.chat(model="smollm2", messages=messages, options={"num_predict": 1})
        assert base.prompt_eval_count != chat.prompt_eval_count
    finally:
        client.delete("go-template")
    with pytest.raises(ollama.ResponseError) as caught:
        client.create(model="bad-template", from_="smollm2", template='{{ template "x" }}')
    assert caught.value.status_code == 400 and "'template' is not supported" in str(caught.value)
    with pytest.raises(ollama.ResponseError) as caught:
        client.create(model="bad-jinja", from_="smollm2", template="{% for x in %}")
    assert caught.value.status_code == 400 and "not a valid chat template" in str(caught.value)
    assert "bad-template" not in str(client.list()) and "bad-jinja" not in str(client.list())


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/api/chat", b"{oops", 400),
        ("/api/chat", b'{"messages": [{"role": "user", "content": "x"}]}', 400),
        (
            "/api/chat",
            b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}',
            404,
        ),
        ("/api/chat", b'{"model": "smollm2", "messages": "x"}', 400),
        (
            "/api/chat",
            b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], '
            b'"options": {"num_predict": "many"}}',
            400,
        ),
        ("/api/generate", b'{"model": "smollm2", "prompt": ["x"]}', 400),
        ("/api/embed", b'{"model": "smollm2"}', 400),
        ("/api/show", b'{"model": "no-such-model"}', 404),
    ],
    ids=[
        "json",
        "no-model",
        "unknown-model",
        "messages-type",
        "option-type",
        "prompt-type",
        "no-input",
        "show-unknown",
    ],
)
def test_malformed_requests(api_server: DmrServer, path: str, body: bytes, status: int) -> None:
    with api_server.client() as http:
        response = http.post(path, content=body)
        assert response.status_code == status
        payload = response.json()
        assert list(payload) == ["error"] and payload["error"]
        assert http.get("/api/tags").status_code == 200


def test_pull_and_push_through_a_registry(
    dmr_server_factory: Callable[..., DmrServer], oci_registry: object, smollm2_gguf: Path
) -> None:
    from dmr.distribution.packaging import package_gguf, write_to_store
    from dmr.store import Store

    server = dmr_server_factory(INSECURE_REGISTRY="true")
    write_to_store(
        Store.open(server.models_path), package_gguf([smollm2_gguf]), ["ai/smollm2:latest"]
    )
    client = ollama.Client(host=server.url)
    remote = f"{oci_registry.url.removeprefix('http://')}/ai/smollm2-pushed:v1"  # type: ignore[attr-defined]
    client.copy("smollm2", remote)
    pushed = list(client.push(remote, insecure=True, stream=True))
    assert pushed[-1].status == "success"
    client.delete(remote)
    assert remote not in {m.model for m in client.list().models}
    pulled = list(client.pull(remote, insecure=True, stream=True))
    assert pulled[0].status == "pulling manifest" and pulled[-1].status == "success"
    layers = [p for p in pulled if p.digest]
    assert layers and all(p.total and p.total > 0 for p in layers)
    assert any(p.completed == p.total for p in layers)
    assert remote in {m.model for m in client.list().models}


def test_llama_cpp_sampling_options_reach_the_model(
    client: ollama.Client, api_server: DmrServer
) -> None:
    """Ollama's mirostat, typical_p and repeat_last_n options sample as the same fields
    sent to the OpenAI API do (seeded: token for token), and each changes the answer."""
    chat = openai.OpenAI(base_url=f"{api_server.url}/engines/v1", api_key="unused").chat
    messages = [{"role": "user", "content": "Write a poem about the sea."}]
    seeded = {"temperature": 1.0, "seed": 7}

    def through_ollama(options: dict[str, Any]) -> str | None:
        options = {**seeded, "num_predict": 24, **options}
        return client.chat(model="smollm2", messages=messages, options=options).message.content

    plain = through_ollama({})
    for options in (
        {"mirostat": 2, "mirostat_tau": 3.0},
        {"typical_p": 0.5},
        {"repeat_penalty": 2.0, "repeat_last_n": 16},
    ):
        mine = through_ollama(options)
        assert mine != plain, options
        openai_answer = chat.completions.create(
            model="ai/smollm2",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=24,
            extra_body={**seeded, **options},
        )
        assert mine == openai_answer.choices[0].message.content, options
