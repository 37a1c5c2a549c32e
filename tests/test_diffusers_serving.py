"""Image generation end to end: package -> push -> pull -> a live `dmr serve` runs the
tiny diffusers pipeline -> the official `openai` client, `dmr run` and the web page.

Real components throughout: the docker-registry, the dmr server and CLI, the
diffusers runner on CPU. One server for the module (xdist keeps it on one worker).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from PIL import Image
from playwright.sync_api import Page

from tests.fixtures.registry import LocalRegistry
from tests.fixtures.server import DmrServer, start_server
from tests.test_web_ui import browser, page  # noqa: F401  (the browser fixtures)

pytestmark = [pytest.mark.diffusers, pytest.mark.registry, pytest.mark.xdist_group("diffusers")]

PROMPT = "a red square on a white table"


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DmrServer]:
    server = start_server(tmp_path_factory.mktemp("dmr-diffusers"), {"INSECURE_REGISTRY": "true"})
    yield server
    server.stop()


def _round_trip(server: DmrServer, tag: str, *package_args: str) -> None:
    """Package into the store and push, then drop the local copy and pull it back."""
    packaged = server.cli("package", *package_args, tag, "--push")
    assert packaged.returncode == 0, packaged.stderr + packaged.stdout
    removed = server.cli("rm", tag)
    assert removed.returncode == 0, removed.stderr
    with server.client() as client:
        assert client.get(f"/models/{tag}").status_code == 404
    pulled = server.cli("pull", tag)
    assert pulled.returncode == 0, pulled.stderr + pulled.stdout


@pytest.fixture(scope="module")
def dir_model(
    image_server: DmrServer, oci_registry: LocalRegistry, tiny_diffusers_dir: Path
) -> str:
    """The tiny pipeline packaged as a diffusers directory, pulled from the registry."""
    tag = f"{oci_registry.host}/tests/tiny-sd:dir"
    _round_trip(image_server, tag, "--safetensors-dir", str(tiny_diffusers_dir))
    return tag


@pytest.fixture(scope="module")
def dduf_model(
    image_server: DmrServer, oci_registry: LocalRegistry, tiny_diffusers_dduf: Path
) -> str:
    tag = f"{oci_registry.host}/tests/tiny-sd:dduf"
    _round_trip(image_server, tag, "--dduf", str(tiny_diffusers_dduf))
    return tag


@pytest.fixture
def client(image_server: DmrServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=image_server.url + "/engines/v1", api_key="unused", timeout=120
    ) as made:
        yield made


def _decode(b64: str | None) -> Image.Image:
    assert b64, "no b64_json in the answer"
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image


def _generate(
    client: openai.OpenAI, model: str, *, seed: int, n: int = 1, size: str = "64x64"
) -> list[Image.Image]:
    answer = client.images.generate(
        model=model,
        prompt=PROMPT,
        n=n,
        size=size,  # type: ignore[arg-type]  (any WxH, not only OpenAI's sizes)
        response_format="b64_json",
        extra_body={"seed": seed, "steps": 4},
    )
    assert answer.created > 0
    return [_decode(item.b64_json) for item in answer.data or []]


def test_directory_model_is_a_diffusers_model(image_server: DmrServer, dir_model: str) -> None:
    with image_server.client() as http:
        config = http.get(f"/models/{dir_model}").json()["config"]
    assert config["format"] == "diffusers"
    assert config["architecture"] == "StableDiffusionPipeline"
    assert config["diffusers"]["components"] == "scheduler,text_encoder,tokenizer,unet,vae"


def test_openai_client_generates_a_png_of_the_requested_size(
    client: openai.OpenAI, dir_model: str
) -> None:
    [image] = _generate(client, dir_model, seed=1)
    assert image.size == (64, 64)
    [wide] = _generate(client, dir_model, seed=1, size="128x64")
    assert wide.size == (128, 64)


def test_n_gives_that_many_images(client: openai.OpenAI, dir_model: str) -> None:
    images = _generate(client, dir_model, seed=2, n=2)
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    assert images[0].tobytes() != images[1].tobytes()


def test_same_seed_gives_the_same_image(client: openai.OpenAI, dir_model: str) -> None:
    first = _generate(client, dir_model, seed=3)[0].tobytes()
    assert _generate(client, dir_model, seed=3)[0].tobytes() == first
    assert _generate(client, dir_model, seed=4)[0].tobytes() != first


def test_bad_requests_are_clear_400s(
    client: openai.OpenAI, image_server: DmrServer, dir_model: str
) -> None:
    with pytest.raises(openai.BadRequestError, match="multiples of 8"):
        _generate(client, dir_model, seed=1, size="65x64")
    with pytest.raises(openai.BadRequestError, match="'url' is not supported"):
        client.images.generate(model=dir_model, prompt=PROMPT, response_format="url")
    with image_server.client() as http:
        answer = http.post(
            "/v1/images/generations", json={"model": dir_model, "prompt": PROMPT, "size": "big"}
        )
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "size"
    assert answer.json()["error"]["type"] == "invalid_request_error"


def test_dduf_model_gives_the_same_images_as_the_directory(
    client: openai.OpenAI, dir_model: str, dduf_model: str
) -> None:
    from_dduf = _generate(client, dduf_model, seed=5)[0]
    from_dir = _generate(client, dir_model, seed=5)[0]
    assert from_dduf.size == (64, 64)
    assert from_dduf.tobytes() == from_dir.tobytes()  # the same weights, unpacked


def test_engine_status_and_runners(image_server: DmrServer, dir_model: str) -> None:
    with image_server.client() as http:
        http.post(
            "/engines/v1/images/generations",
            json={"model": dir_model, "prompt": "x"},
            headers={"X-Preload-Only": "true"},
        ).raise_for_status()
        status = http.get("/engines/status").json()
        runners = http.get("/engines/ps").json()
    assert status["diffusers"].startswith("Running: diffusers ")
    assert any(
        r["backend_name"] == "diffusers" and r["mode"] == "image-generation" for r in runners
    )


def test_dmr_run_writes_png_files(image_server: DmrServer, dir_model: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = image_server.cli(
        "run",
        dir_model,
        PROMPT,
        "--output-dir",
        str(out),
        "--size",
        "64x64",
        "--steps",
        "4",
        "--seed",
        "9",
    )
    assert result.returncode == 0, result.stderr
    [printed] = result.stdout.split()
    path = Path(printed)
    assert path.parent == out.resolve() and path.suffix == ".png"
    assert _decode(base64.b64encode(path.read_bytes()).decode()).size == (64, 64)
    again = image_server.cli(
        "run",
        dir_model,
        PROMPT,
        "--output-dir",
        str(out),
        "--size",
        "64x64",
        "--steps",
        "4",
        "--seed",
        "9",
    )
    assert again.returncode == 0, again.stderr
    second = Path(again.stdout.strip())
    assert second != path and second.read_bytes() == path.read_bytes()  # no overwrite


def test_dmr_run_reports_a_bad_size(image_server: DmrServer, dir_model: str) -> None:
    result = image_server.cli("run", dir_model, PROMPT, "--size", "10x10")
    assert result.returncode == 1
    assert "multiples of 8" in result.stderr
    assert "Traceback" not in result.stderr


def test_web_page_generates_and_shows_an_image(
    image_server: DmrServer,
    dir_model: str,
    page: Page,  # noqa: F811
) -> None:
    page.goto(image_server.url + "/ui")
    page.locator(f'#models tbody tr[data-model="{dir_model}"]').wait_for(timeout=15_000)
    page.select_option("#image-model", dir_model)
    page.fill("#image-prompt", PROMPT)
    page.select_option("#image-size", "256x256")
    page.fill("#image-steps", "2")
    page.click("#image-generate")
    shown = page.locator("#images img")
    shown.wait_for(timeout=60_000)
    source = shown.get_attribute("src") or ""
    assert source.startswith("data:image/png;base64,")
    assert _decode(source.split(",", 1)[1]).size == (256, 256)
    # Rendered, not just present: the browser decoded the PNG.
    assert page.evaluate("() => document.querySelector('#images img').naturalWidth") == 256
