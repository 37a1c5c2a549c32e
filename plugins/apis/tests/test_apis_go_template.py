"""Ollama's Go chat templates translated to Jinja, checked against Go's own rendering.

`go_templates/golden.json` holds what Go's text/template renders (through
`go_templates/ollama_render.go`, which follows Ollama's template.Execute) for
several real-world-shaped templates, conversations with and without tools. The
translation must render the same text in the runner's Jinja environment.
"""

from __future__ import annotations

import copy
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import pytest
from dmr_apis.ollama.go_template import GoTemplateError, go_to_jinja, looks_like_go_template
from jinja2.sandbox import ImmutableSandboxedEnvironment

GOLDEN = json.loads((Path(__file__).parent / "go_templates" / "golden.json").read_text())


def runner_environment() -> jinja2.Environment:
    """The settings dmr's llama.cpp runner renders chat templates with."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, ensure_ascii=False, indent=indent
    )
    return environment


def openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the runner receives: tool-call arguments as a JSON string, as OpenAI sends them."""
    converted = copy.deepcopy(messages)
    for message in converted:
        for call in message.get("tool_calls", []):
            call["type"] = "function"
            call["function"]["arguments"] = json.dumps(
                call["function"]["arguments"], separators=(",", ":")
            )
    return converted


def render(template: str, messages: list[dict[str, Any]], tools: Any = None) -> str:
    return (
        runner_environment()
        .from_string(go_to_jinja(template))
        .render(
            messages=openai_messages(messages),
            tools=tools,
            add_generation_prompt=True,
            strftime_now=lambda fmt: datetime.now().strftime(fmt),
        )
    )


def json_spacing(text: str) -> str:
    """Go's json writes `{"a":1}`, Python's `{"a": 1}`: the one documented difference."""
    return re.sub(r'(?<=[,:]) (?=["{\[\d])', "", text)


@pytest.mark.parametrize(
    "case",
    GOLDEN,
    ids=[f"{c['name']}-{c['conversation']}{'-tools' if c['tools'] else ''}" for c in GOLDEN],
)
def test_translation_renders_what_go_renders(case: dict[str, Any]) -> None:
    rendered = render(case["template"], case["messages"], case["tools"])
    if case["tools"]:
        assert json_spacing(rendered) == json_spacing(case["expected"])
    else:
        assert rendered == case["expected"]


def test_golden_cases_cover_both_kinds_of_template() -> None:
    legacy = {c["name"] for c in GOLDEN if ".Messages" not in c["template"]}
    with_messages = {c["name"] for c in GOLDEN if ".Messages" in c["template"]}
    assert {"mistral", "gemma", "chatml_legacy"} <= legacy
    assert {"qwen", "llama3", "phi3"} <= with_messages


def test_legacy_template_renders_every_turn_and_cuts_the_last_after_response() -> None:
    template = "<s>{{ .Prompt }}|{{ .Response }}</s>"
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert render(template, messages) == "<s>a|b</s><s>c|"


def test_trim_markers_and_runner_whitespace_settings() -> None:
    # trim_blocks/lstrip_blocks in the runner must not eat the template's newlines.
    template = "A\n  {{- if .System }}\n{{ .System }}\n{{ end -}}\n  B {{ .Prompt }}\n"
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "P"}]
    assert render(template, messages) == "A\nS\nB P\n"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ('{{ define "x" }}y{{ end }}', "'define' is not supported"),
        ('{{ template "x" . }}', "'template' is not supported"),
        ("{{ toTypeScriptType .Tools }}", "function 'toTypeScriptType' is not supported"),
        ("{{ if .System }}open", "missing {{ end }}"),
        ("{{ end }}", "unexpected {{ end }}"),
        ("{{ .Prompt ", "unclosed action"),
        ("{{ else }}", "outside if/range/with"),
        ("{{ eq .Role }}", "wrong number of arguments for 'eq'"),
    ],
)
def test_refused_templates_say_why(template: str, message: str) -> None:
    with pytest.raises(GoTemplateError, match=re.escape(message)):
        go_to_jinja(template)


@pytest.mark.parametrize(
    ("source", "is_go"),
    [
        ("{{ .System }} {{ .Prompt }}", True),
        ("{{- range .Messages }}{{ .Content }}{{ end }}", True),
        ("{% for m in messages %}{{ m.content }}{% endfor %}", False),
        ("{{ messages[0]['content'] }}", False),
        ("plain text", False),
    ],
)
def test_go_templates_are_told_from_jinja(source: str, is_go: bool) -> None:
    assert looks_like_go_template(source) is is_go
