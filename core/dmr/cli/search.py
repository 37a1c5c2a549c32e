"""`dmr search [TERM]`: models in Docker Hub's `ai/` namespace and on the Hugging Face Hub.

As `docker model search` does it, the search runs in the CLI, against the two
public APIs; the server is not involved:
- Docker Hub: `GET /v2/repositories/ai/?page_size=N&ordering=-pull_count`, pages
  followed, public repositories whose name or description holds TERM;
- Hugging Face: `GET /api/models?apps=vllm,llama.cpp&sort=downloads&direction=-1
  &limit=N&search=TERM`, the models llama.cpp or vLLM can run.
`DMR_DOCKER_HUB_URL` and `HF_ENDPOINT` (huggingface-hub's own variable) point
them elsewhere (a mirror, or the tests' local endpoints).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import click

from dmr.cli.errors import fail

__all__ = ["SearchResult", "search"]

DOCKER_HUB_URL = "https://hub.docker.com"
HUGGING_FACE_URL = "https://huggingface.co"
DOCKER_HUB = "Docker Hub"
HUGGING_FACE = "HuggingFace"
DESCRIPTION_WIDTH = 50
_SOURCES = ("all", "dockerhub", "huggingface")


@dataclass
class SearchResult:
    """One model; the JSON keys are those `docker model search --json` prints."""

    Name: str
    Description: str
    Downloads: int
    Stars: int
    Source: str
    Official: bool
    UpdatedAt: str
    Backend: str
    Size: int = 0


def _truncate(text: str, width: int = DESCRIPTION_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _backend(words: str) -> str:
    """llama.cpp for GGUF, vllm for safetensors, both when both are named."""
    words = words.lower()
    vllm = "vllm" in words or "safetensors" in words
    llama = any(marker in words for marker in ("gguf", "llama.cpp", "llamacpp", "llama-cpp"))
    if vllm and llama:
        return "llama.cpp, vllm"
    return "vllm" if vllm else "llama.cpp"


def _get_json(client: Any, url: str, params: dict[str, str] | None, source: str) -> Any:
    import httpx

    try:
        response = client.get(url, params=params)
    except httpx.HTTPError as error:
        raise click.ClickException(f"{source} could not be reached: {error}") from error
    if response.status_code == 429:
        raise click.ClickException(f"rate limited by {source}, try again later")
    if response.status_code != 200:
        raise click.ClickException(f"{source} answered {response.status_code}")
    try:
        return response.json()
    except ValueError as error:
        raise click.ClickException(f"{source} answered with something not JSON") from error


def search_docker_hub(client: Any, query: str, limit: int) -> list[SearchResult]:
    base = os.environ.get("DMR_DOCKER_HUB_URL", DOCKER_HUB_URL).rstrip("/")
    url: str | None = f"{base}/v2/repositories/ai/"
    params: dict[str, str] | None = {
        "page_size": str(min(limit, 100)),
        "ordering": "-pull_count",
    }
    query = query.lower()
    results: list[SearchResult] = []
    while url and len(results) < limit:
        page = _get_json(client, url, params, DOCKER_HUB)
        params = None  # `next` carries them
        for repo in page.get("results") or []:
            name, description = str(repo.get("name", "")), str(repo.get("description") or "")
            if repo.get("is_private") or (
                query and query not in name.lower() and query not in description.lower()
            ):
                continue
            namespace = str(repo.get("namespace") or "ai")
            results.append(
                SearchResult(
                    Name=f"{namespace}/{name}",
                    Description=_truncate(description),
                    Downloads=int(repo.get("pull_count") or 0),
                    Stars=int(repo.get("star_count") or 0),
                    Source=DOCKER_HUB,
                    Official=namespace == "ai",
                    UpdatedAt=str(repo.get("last_updated") or ""),
                    Backend=_backend(f"{name} {description}"),
                )
            )
            if len(results) >= limit:
                break
        url = page.get("next") or None
    return results


def search_hugging_face(client: Any, query: str, limit: int) -> list[SearchResult]:
    base = os.environ.get("HF_ENDPOINT", HUGGING_FACE_URL).rstrip("/")
    params = {
        "apps": "vllm,llama.cpp",
        "sort": "downloads",
        "direction": "-1",
        "limit": str(min(limit, 1000)),
    }
    if query:
        params["search"] = query
    models = _get_json(client, f"{base}/api/models", params, HUGGING_FACE)
    results: list[SearchResult] = []
    for model in models if isinstance(models, list) else []:
        if model.get("private"):
            continue
        tags = [str(tag).lower() for tag in model.get("tags") or []]
        shown = [model["pipeline_tag"]] if model.get("pipeline_tag") else []
        shown += [tag for tag in tags if tag not in {"gguf", "safetensors", "transformers"}][:2]
        backend = "unknown"
        if "gguf" in tags or "safetensors" in tags:
            backend = _backend(" ".join(tags))
        results.append(
            SearchResult(
                Name=str(model.get("modelId") or model.get("id") or ""),
                Description=_truncate(", ".join(shown) or "AI model"),
                Downloads=int(model.get("downloads") or 0),
                Stars=int(model.get("likes") or 0),
                Source=HUGGING_FACE,
                Official=False,
                UpdatedAt=str(model.get("createdAt") or ""),
                Backend=backend,
            )
        )
    return results


def _count(value: int) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 1_000:
        return f"{value / 1_000:.1f}K"
    return str(value)


@click.command()
@click.argument("term", required=False, default="")
@click.option("-n", "--limit", default=32, show_default=True, type=click.IntRange(min=1),
              help="Most results per source.")  # fmt: skip
@click.option("--source", type=click.Choice(_SOURCES), default="all", show_default=True,
              help="Where to search.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def search(term: str, limit: int, source: str, as_json: bool) -> None:
    """Search Docker Hub's ai/ namespace and Hugging Face for models matching TERM."""
    import httpx

    results: list[SearchResult] = []
    headers = {"Accept": "application/json"}
    with httpx.Client(timeout=30, follow_redirects=True, headers=headers) as client:
        try:
            if source in ("all", "dockerhub"):
                results += search_docker_hub(client, term, limit)
            if source in ("all", "huggingface"):
                results += search_hugging_face(client, term, limit)
        except click.ClickException as error:
            fail(f"search failed: {error.message}")
    if as_json:
        click.echo(json.dumps([asdict(result) for result in results], indent=4))
        return
    if not results:
        click.echo(f"No models found matching {term!r}" if term else "No models found")
        return
    from rich.table import Table

    from dmr.cli.main import print_table

    table = Table("NAME", "DESCRIPTION", "BACKEND", "DOWNLOADS", "STARS", "SOURCE", box=None)
    for result in results:
        name = f"hf.co/{result.Name}" if result.Source == HUGGING_FACE else result.Name
        table.add_row(name, result.Description, result.Backend, _count(result.Downloads),
                      _count(result.Stars), result.Source)  # fmt: skip
    print_table(table)
