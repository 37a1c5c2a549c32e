"""The `/ui` page in a real headless browser (Debian's chromium driven by Playwright)
against a live server: listing, streamed chat with history, runners, pull and delete."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from dmr.distribution import packaging
from dmr.distribution.packaging import PackageOptions
from dmr.store import Store
from playwright.sync_api import Browser, Page, Request, Route, expect, sync_playwright

from tests.fixtures.hf_hub import tiny_gguf
from tests.fixtures.registry import LocalRegistry
from tests.fixtures.server import DmrServer
from tests.fixtures.vision_projector import sample_png

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():  # scripts/install-test-deps installs it
        pytest.skip("Debian's chromium is not installed")
    with sync_playwright() as playwright:
        # --no-sandbox: the tests may run as root in a container, where chromium's
        # sandbox cannot start.
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A page that may reach 127.0.0.1 only: any other request fails the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 720})
    outside: list[str] = []

    def guard(route: Route) -> None:
        url = route.request.url
        if urlsplit(url).scheme in ("data", "blob") or urlsplit(url).hostname == "127.0.0.1":
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    context.route("**/*", guard)
    new_page = context.new_page()
    page_errors: list[str] = []
    new_page.on("pageerror", lambda error: page_errors.append(str(error)))
    yield new_page
    context.close()
    assert not outside, f"the page reached outside 127.0.0.1: {outside}"
    assert not page_errors, page_errors


# Records the assistant answer's length at every DOM change, to see it grow.
WATCH_ANSWER = """() => {
  window.__lengths = [];
  new MutationObserver(() => {
    const answers = document.querySelectorAll('#chat-log .msg.assistant .text');
    const last = answers[answers.length - 1];
    if (last) window.__lengths.push(last.textContent.length);
  }).observe(document.querySelector('#chat-log'),
             {subtree: true, childList: true, characterData: true});
}"""


@pytest.mark.llama
@pytest.mark.xdist_group("smollm2")
def test_page_lists_models_and_streams_a_chat(smollm2_server: DmrServer, page: Page) -> None:
    p = page
    chats: list[dict[str, object]] = []

    def record(request: Request) -> None:
        if request.url.endswith("/engines/v1/chat/completions") and request.post_data:
            chats.append(json.loads(request.post_data))

    p.on("request", record)
    p.goto(smollm2_server.url + "/ui")

    row = p.locator('#models tbody tr[data-model="ai/smollm2:latest"]')
    row.wait_for(timeout=15_000)
    cells = [row.locator("td").nth(i).inner_text() for i in (2, 3, 4, 5)]
    assert cells == ["gguf", "Q4_1", "134.52 M", "93.81 MiB"]
    # Other tests sharing this server may add models: choose SmolLM2 explicitly.
    assert "ai/smollm2:latest" in p.locator("#text-models option").evaluate_all(
        "options => options.map(o => o.value)"
    )
    p.fill("#chat-model", "ai/smollm2:latest")

    # A 135M model may ramble: cap the answers so the test stays short.
    p.fill("#chat-max-tokens", "48")
    p.evaluate(WATCH_ANSWER)
    p.fill("#chat-input", "Name three colours of the rainbow.")
    p.press("#chat-input", "Enter")
    answer = p.locator("#chat-log .msg.assistant.done .text").first
    answer.wait_for(timeout=240_000)
    first_text = answer.inner_text()
    lengths: list[int] = p.evaluate("window.__lengths")

    assert first_text.strip(), "empty answer"
    assert int(answer.get_attribute("data-chunks") or 0) >= 3
    grown = sorted(set(n for n in lengths if n > 0))
    assert len(grown) >= 3, f"the answer did not grow in steps: {lengths}"
    assert lengths == sorted(lengths), "the answer shrank while streaming"
    assert p.locator(".msg.error").count() == 0

    # A second turn carries the first one: the conversation history is sent along.
    p.fill("#chat-input", "And one more?")
    p.press("#chat-input", "Enter")
    p.locator("#chat-log .msg.assistant.done").nth(1).wait_for(timeout=240_000)
    errors = p.locator(".msg.error").all_inner_texts()
    assert not errors, errors
    assert len(chats) == 2 and chats[1]["stream"] is True and chats[1]["max_tokens"] == 48
    assert chats[1]["messages"] == [
        {"role": "user", "content": "Name three colours of the rainbow."},
        {"role": "assistant", "content": first_text},
        {"role": "user", "content": "And one more?"},
    ]

    # The runner the chat loaded shows up with its memory and keep-alive.
    # Other tests on this shared server may have loaded an embedding runner too.
    runner = p.locator("#runners tbody tr", has_text="ai/smollm2").filter(has_text="completion")
    runner.wait_for(timeout=15_000)
    cells = runner.locator("td").all_inner_texts()
    assert cells[1] == "llama.cpp" and cells[2] == "completion"
    assert cells[3].endswith("iB") and cells[4] not in ("", "—")

    ARTIFACTS.mkdir(exist_ok=True)
    p.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)


@pytest.mark.llama
@pytest.mark.xdist_group("smollm2")
def test_page_sends_an_image_with_a_message(
    smollm2_server: DmrServer, page: Page, tmp_path: Path
) -> None:
    """The chat's image picker sends the file with the message as an OpenAI
    `image_url` part; SmolLM2 has no projector, so the page shows the runner's 400
    rather than an answer that ignored the image."""
    picture = tmp_path / "photo.png"
    picture.write_bytes(sample_png())
    chats: list[dict[str, object]] = []

    def record(request: Request) -> None:
        if request.url.endswith("/engines/v1/chat/completions") and request.post_data:
            chats.append(json.loads(request.post_data))

    p = page
    p.on("request", record)
    p.goto(smollm2_server.url + "/ui")
    p.locator('#models tbody tr[data-model="ai/smollm2:latest"]').wait_for(timeout=15_000)
    p.fill("#chat-model", "ai/smollm2:latest")
    p.fill("#chat-max-tokens", "8")
    p.set_input_files("#chat-image", str(picture))
    p.fill("#chat-input", "What is in this picture?")
    p.press("#chat-input", "Enter")
    refused = p.locator("#chat-log .msg.assistant.done.error .text").first
    refused.wait_for(timeout=240_000)

    assert "does not accept images" in refused.inner_text()
    url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    assert chats[-1]["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]
    assert "[image: photo.png]" in p.locator("#chat-log .msg.user .text").last.inner_text()
    assert p.input_value("#chat-image") == ""  # the next message goes without it


@pytest.mark.registry
def test_page_pulls_with_progress_and_deletes(
    oci_registry: LocalRegistry,
    dmr_server_factory: Callable[..., DmrServer],
    tmp_path: Path,
    page: Page,
) -> None:
    server = dmr_server_factory(INSECURE_REGISTRY="true")
    tag = f"{oci_registry.host}/tests/web-ui:v1"
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(tiny_gguf(tag, 4_000_000))
    artifact = packaging.package_gguf([gguf], PackageOptions(created="2024-01-01T00:00:00Z"))
    packaging.write_to_store(Store.open(server.models_path), artifact, [tag])
    pushed = server.cli("push", tag)
    assert pushed.returncode == 0, pushed.stderr + pushed.stdout
    with server.client() as client:
        assert client.delete(f"/models/{tag}").status_code == 200

    p = page
    p.goto(server.url + "/ui")
    p.locator("#models td.empty").wait_for(timeout=15_000)
    p.evaluate(
        """() => { window.__messages = [];
          new MutationObserver(() => window.__messages.push(
              document.querySelector('#pull-message').textContent))
            .observe(document.querySelector('#pull-message'),
                     {subtree: true, childList: true, characterData: true}); }"""
    )
    p.fill("#pull-ref", tag)
    p.click("#pull-form button")

    row = p.locator(f'#models tbody tr[data-model="{tag}"]')
    row.wait_for(timeout=60_000)
    messages: list[str] = p.evaluate("window.__messages")
    assert any("pulled successfully" in m for m in messages), messages
    assert len(messages) >= 2, f"no progress before the end: {messages}"
    assert p.get_attribute("#pull-bar", "value") == "1"

    p.once("dialog", lambda dialog: dialog.accept())
    row.locator("button.danger").click()
    row.wait_for(state="detached", timeout=15_000)
    with server.client() as client:
        assert client.get("/models").json() == []


# A 1x1 PNG: what the image route answers here. No diffusers runner is installed by
# the test command, so this test covers the page's side of image generation only:
# the browser's calls to `/models` and the image route are answered by the test.
PIXEL = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9"
    "awAAAABJRU5ErkJggg=="
)


def test_page_generates_images_with_image_models(dmr_server: DmrServer, page: Page) -> None:
    image_model = {
        "id": "sha256:" + "ab" * 32,
        "tags": ["ai/tiny-sd:latest"],
        "created": 0,
        "config": {"format": "diffusers", "size": "1.00 MiB"},
    }
    asked: list[dict[str, object]] = []

    def models(route: Route) -> None:
        route.fulfill(json=[image_model])

    def images(route: Route) -> None:
        asked.append(json.loads(route.request.post_data or "{}"))
        route.fulfill(json={"created": 0, "data": [{"b64_json": PIXEL}]})

    page.route("**/models", models)
    page.route("**/engines/v1/images/generations", images)
    page.goto(dmr_server.url + "/ui")
    page.locator('#models tbody tr[data-model="ai/tiny-sd:latest"]').wait_for(timeout=15_000)
    # An image model is no chat model.
    assert page.input_value("#chat-model") == ""
    assert page.input_value("#image-model") == "ai/tiny-sd:latest"

    page.fill("#image-prompt", "a red square")
    page.click("#image-generate")
    page.locator("#images img").wait_for(timeout=15_000)

    assert page.get_attribute("#images img", "src") == f"data:image/png;base64,{PIXEL}"
    assert asked == [
        {
            "model": "ai/tiny-sd:latest",
            "prompt": "a red square",
            "size": "512x512",
            "n": 1,
            "response_format": "b64_json",
        }
    ]


def test_wheel_ships_the_page(tmp_path: Path) -> None:
    """The page's files are package data of `dmr`: a wheel built from the checkout
    (hatchling, no build isolation: no network) carries them."""
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check"]
    built = subprocess.run(
        [*pip_wheel, "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("dmr-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("index.html", "ui.css", "ui.js"):
        assert f"dmr/server/static/ui/{name}" in names


def test_page_sends_a_pasted_api_key(
    dmr_server_factory: Callable[..., DmrServer], page: Page
) -> None:
    server = dmr_server_factory(DMR_API_KEY="ui-secret")
    keys: list[str | None] = []

    def record(request: Request) -> None:
        if request.url.endswith("/models"):
            keys.append(request.headers.get("authorization"))

    page.on("request", record)
    page.goto(server.url + "/ui")  # the page itself needs no key

    error = page.locator("#error")
    error.wait_for(timeout=15_000)
    assert "API key" in error.inner_text()

    page.fill("#api-key", "ui-secret")
    page.click("#key-form button")
    page.locator("#models td.empty").wait_for(timeout=15_000)
    assert page.locator("#error").is_hidden()
    assert keys[0] is None and keys[-1] == "Bearer ui-secret"
    # The version comes from its own request, which may land after the models table.
    expect(page.locator("#version")).to_have_text(re.compile(r"^v\d"), timeout=15_000)


def test_page_lists_batches_with_their_progress(
    dmr_server_factory: Callable[..., DmrServer], page: Page
) -> None:
    from tests.fixtures.test_engine import add_test_model

    server = dmr_server_factory()
    add_test_model(server.models_path, "test/a")
    p = page
    p.goto(server.url + "/ui")
    p.locator("#batches tbody td.empty").wait_for(timeout=15_000)
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "test/a", "messages": [{"role": "user", "content": "hi"}]}}
        for i in range(3)
    ]  # fmt: skip
    data = "\n".join(json.dumps(line) for line in lines) + "\nnot json\n"
    with server.client() as client:
        uploaded = client.post(
            "/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", data.encode())}
        ).json()
        batch = client.post(
            "/v1/batches",
            json={"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions",
                  "completion_window": "24h"},
        ).json()  # fmt: skip

    row = p.locator("#batches tbody tr", has_text=batch["id"]).filter(has_text="completed")
    row.wait_for(timeout=20_000)  # the table refreshes every 3 s
    cells = row.locator("td").all_inner_texts()
    assert cells[1:3] == ["completed", "/v1/chat/completions"]
    assert cells[3].strip() == "4/4" and cells[4] == "1"
    assert row.locator("progress").get_attribute("value") == "4"
