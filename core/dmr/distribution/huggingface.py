"""Models on the Hugging Face Hub (built-in plugin): `hf.co/org/repo[:QUANT]`.

Names and file choice as DMR's (docs/compatibility.md §1).

huggingface_hub lists the repository and names the URLs; the files are streamed
straight into the store's blobs (resumable, verified against the Hub's sha256
for LFS files and the git blob id for small ones) and packaged as a DMR artifact
tagged with the normalised reference.

This module is registered at server start, so huggingface_hub (with its own HTTP
stack, tqdm and yaml: about 11 MB resident), httpx, packaging and the progress
helpers are imported by the first Hub pull, not here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from dmr.distribution.threaded_puller import ThreadedPuller
from dmr.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    RegistryError,
)
from dmr.hookspecs import hookimpl
from dmr.records import ModelSource, ProgressCallback
from dmr.reference import HUGGINGFACE_REGISTRY, parse_reference
from dmr.store.artifact import safe_relative_path
from dmr.store.blobs import link_or_copy

if TYPE_CHECKING:
    import httpx
    from huggingface_hub.hf_api import RepoFile

    from dmr.distribution.progress import TransferProgress
    from dmr.store import Store

__all__ = [
    "DEFAULT_QUANT",
    "HF_SOURCE",
    "RepoPlan",
    "dmr_model_sources",
    "plan_repository",
]

log = logging.getLogger(__name__)

DEFAULT_QUANT = "Q4_K_M"
REVISION = "main"
CHUNK_SIZE = 1 << 20
SMALL_FILE_MAX = 64 << 20  # non-LFS files (configs, templates) are read into memory
ATTEMPTS = 4
PARALLEL_FILES = 4
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_HF_PREFIX = re.compile(r"^(?:hf\.co|huggingface\.co)/", re.IGNORECASE)
# Files a safetensors model needs besides its weights (config, tokenizer, template).
_SAFETENSORS_EXTRAS = re.compile(
    r"(\.json|\.jinja|\.txt|\.model|\.tiktoken|tokenizer[^/]*)$", re.IGNORECASE
)


@dataclass(frozen=True)
class RepoPlan:
    """What to take from a repository."""

    format: str  # "gguf" | "safetensors"
    weights: tuple[RepoFile, ...]  # GGUF shards in order, or every *.safetensors
    mmproj: RepoFile | None = None
    template_file: RepoFile | None = None  # *.jinja
    extras: tuple[RepoFile, ...] = ()  # safetensors: config and tokenizer files
    tokenizer_config: RepoFile | None = None  # GGUF: chat_template fallback
    quant: str | None = None

    @property
    def files(self) -> tuple[RepoFile, ...]:
        chosen = [*self.weights, *self.extras]
        for extra in (self.mmproj, self.template_file, self.tokenizer_config):
            if extra is not None and extra not in chosen:
                chosen.append(extra)
        return tuple(chosen)


@dataclass
class _Downloaded:
    digests: dict[str, str] = field(default_factory=dict)  # repo path -> sha256:<hex>


def split_hf_reference(reference: str) -> tuple[str, str | None]:
    """(`org/Repo` with its original case, quant tag or None) from `hf.co/org/Repo:Q4`."""
    text = _HF_PREFIX.sub("", reference.strip())
    if "@" in text:
        raise InvalidRequestError("Hugging Face references take a quantization tag, not a digest")
    name, tag = text, None
    if ":" in text.rsplit("/", 1)[-1]:
        name, _, tag = text.rpartition(":")
    if name.count("/") != 1:
        raise InvalidRequestError(f"invalid Hugging Face repository {name!r}: use org/repo")
    return name, tag if tag and tag != "latest" else None


def _name(file: RepoFile) -> str:
    return PurePosixPath(file.path).name


def _matches_quant(file: RepoFile, quant: str) -> bool:
    pattern = rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])"
    return re.search(pattern, _name(file), re.IGNORECASE) is not None


def _shard_set(chosen: RepoFile, ggufs: Sequence[RepoFile]) -> tuple[RepoFile, ...]:
    """All shards of `chosen` (same stem and count, same folder), in order."""
    match = _SHARD.match(_name(chosen))
    if not match:
        return (chosen,)
    folder = PurePosixPath(chosen.path).parent
    stem, count = match["stem"], match["count"]
    shards = []
    for file in ggufs:
        other = _SHARD.match(_name(file))
        if (
            other
            and other["stem"] == stem
            and other["count"] == count
            and PurePosixPath(file.path).parent == folder
        ):
            shards.append(file)
    shards.sort(key=lambda f: _name(f))
    if len(shards) != int(count):
        raise ModelNotFoundError(
            f"sharded GGUF {stem} is incomplete: {len(shards)} of {int(count)} shards found"
        )
    return tuple(shards)


def plan_repository(files: Sequence[RepoFile], quant: str | None) -> RepoPlan:
    """Choose the files to pull, as DMR does (docs/compatibility.md §1)."""
    files = sorted(files, key=lambda f: f.path)
    ggufs = [f for f in files if _name(f).lower().endswith(".gguf")]
    mmprojs = [f for f in ggufs if "mmproj" in _name(f).lower()]
    weights = [f for f in ggufs if f not in mmprojs]
    templates = [f for f in files if _name(f).lower().endswith(".jinja")]
    template = templates[0] if templates else None
    tokenizer_config = next((f for f in files if _name(f) == "tokenizer_config.json"), None)
    if weights:
        wanted = quant or DEFAULT_QUANT
        matching = [f for f in weights if _matches_quant(f, wanted)]
        if not matching:
            matching = [f for f in weights if wanted.lower() in _name(f).lower()]
        if not matching and quant is not None:
            available = ", ".join(_name(f) for f in weights)
            raise ModelNotFoundError(
                f"no GGUF file for quantization {quant!r} in the repository (files: {available})"
            )
        chosen = matching[0] if matching else weights[0]
        return RepoPlan(
            format="gguf",
            weights=_shard_set(chosen, weights),
            mmproj=mmprojs[0] if mmprojs else None,
            template_file=template,
            tokenizer_config=None if template else tokenizer_config,
            quant=wanted if matching else None,
        )
    safetensors = [f for f in files if _name(f).lower().endswith(".safetensors")]
    if safetensors:
        extras = tuple(
            f
            for f in files
            if f not in safetensors
            and _SAFETENSORS_EXTRAS.search(_name(f))
            and not _name(f).startswith(".")
        )
        return RepoPlan(format="safetensors", weights=tuple(safetensors), extras=extras)
    raise ModelNotFoundError("the repository has no GGUF or safetensors files")


def chat_template_from_tokenizer_config(data: bytes) -> str | None:
    """`chat_template` from tokenizer_config.json: a string, or the "default" named one."""
    try:
        config = json.loads(data)
    except ValueError:
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        chosen = named.get("default") or next(iter(named.values()), None)
        return chosen if isinstance(chosen, str) else None
    return None


class _HubDownloader:
    """Streams repository files into the store's blobs."""

    def __init__(
        self,
        repo_id: str,
        commit: str,
        endpoint: str,
        token: str | None,
        store: Store,
        tracker: TransferProgress,
        stop: threading.Event,
    ) -> None:
        import httpx

        self.repo_id = repo_id
        self.commit = commit
        self.endpoint = endpoint
        self.store = store
        self.tracker = tracker
        self.stop = stop
        # httpx honours HTTPS_PROXY/NO_PROXY (trust_env); the Hub redirects LFS files to a CDN.
        self.client = httpx.Client(
            headers={"Authorization": f"Bearer {token}"} if token else {},
            follow_redirects=True,
            timeout=httpx.Timeout(60.0, connect=10.0),
        )

    def close(self) -> None:
        self.client.close()

    def url(self, file: RepoFile) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, file.path, revision=self.commit, endpoint=self.endpoint)

    def fetch(self, file: RepoFile) -> tuple[str, bytes | None]:
        """(sha256 digest, bytes for small files) after storing the file as a blob."""
        from dmr.distribution.progress import TransferCancelledError

        if self.stop.is_set():
            raise TransferCancelledError("pull cancelled")
        if file.lfs is not None:
            digest = "sha256:" + file.lfs.sha256
            if not self.store.has_blob(digest):
                self._stream(file, digest, file.lfs.size)
            self.tracker.update(digest, file.lfs.size, file.lfs.size)
            return digest, None
        data = self._small(file)
        digest = self.store.put_blob_bytes(data)
        self.tracker.update(digest, len(data), len(data))
        return digest, data

    def _small(self, file: RepoFile) -> bytes:
        if file.size > SMALL_FILE_MAX:
            raise RegistryError(f"{file.path} is too large to be a plain git file")
        response = self._get(file, {})
        data = response.content
        response.close()
        # Not in LFS: the Hub only gives its git blob id, sha1("blob <len>\0" + data).
        oid = hashlib.sha1(b"blob %d\x00" % len(data) + data, usedforsecurity=False).hexdigest()
        if file.blob_id and oid != file.blob_id:
            raise RegistryError(f"{file.path} from the Hub does not match its git blob id")
        return data

    def _get(self, file: RepoFile, headers: dict[str, str], stream: bool = False) -> httpx.Response:
        import httpx

        last: Exception | None = None
        for attempt in range(ATTEMPTS):
            try:
                request = self.client.build_request("GET", self.url(file), headers=headers)
                response = self.client.send(request, stream=stream)
            except httpx.TransportError as error:
                last = error
                self.stop.wait(min(8.0, 0.5 * 2**attempt))
                continue
            if response.status_code in (429, 500, 502, 503, 504) and attempt + 1 < ATTEMPTS:
                response.close()
                self.stop.wait(min(8.0, 0.5 * 2**attempt))
                continue
            if response.status_code in (401, 403):
                response.close()
                raise RegistryError(
                    f"the Hub refused {file.path} ({response.status_code}): set HF_TOKEN "
                    "for a private or gated repository"
                )
            if response.status_code not in (200, 206):
                response.close()
                raise RegistryError(f"the Hub answered {response.status_code} for {file.path}")
            return response
        raise RegistryError(f"cannot reach the Hub for {file.path}: {last}")

    def _stream(self, file: RepoFile, digest: str, size: int) -> None:
        import httpx

        from dmr.distribution.progress import TransferCancelledError

        with self.store.blob_writer(digest, size) as writer:
            offset = writer.offset
            failures = 0
            while offset < size:
                headers = {"Range": f"bytes={offset}-"} if offset else {}
                response = self._get(file, headers, stream=True)
                try:
                    skip = offset if response.status_code == 200 else 0
                    for chunk in response.iter_bytes(CHUNK_SIZE):
                        if self.stop.is_set():
                            raise TransferCancelledError("pull cancelled")
                        if skip:
                            dropped = min(skip, len(chunk))
                            chunk, skip = chunk[dropped:], skip - dropped
                            if not chunk:
                                continue
                        writer.write(chunk)
                        offset += len(chunk)
                        self.tracker.update(digest, size, offset)
                except httpx.TransportError as error:
                    failures += 1
                    if failures >= ATTEMPTS:
                        raise RegistryError(
                            f"download of {file.path} kept failing: {error}"
                        ) from error
                finally:
                    response.close()
                if offset < size:
                    failures += 1
                    if failures >= ATTEMPTS:
                        raise RegistryError(f"download of {file.path} ended early")
            writer.commit()


def _created(info: Any) -> datetime | None:
    value = getattr(info, "last_modified", None)
    return value if isinstance(value, datetime) else None


def _pull_blocking(
    reference: str,
    store: Store,
    emit: ProgressCallback,
    bearer_token: str | None,
    stop: threading.Event,
) -> str:
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.hf_api import RepoFile

    from dmr.distribution.progress import TransferProgress, transfer_pool

    repo_id, quant = split_hf_reference(reference)
    familiar = parse_reference(reference).familiar
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    token = bearer_token or os.environ.get("HF_TOKEN") or None
    api = HfApi(endpoint=endpoint, token=token or False, library_name="dmr")
    try:
        info = api.model_info(repo_id, revision=REVISION)
        commit = info.sha or REVISION
        entries = api.list_repo_tree(repo_id, recursive=True, revision=commit)
        files = [entry for entry in entries if isinstance(entry, RepoFile)]
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise ModelNotFoundError(f"model {repo_id} not found on Hugging Face") from error
    except GatedRepoError as error:
        raise RegistryError(f"{repo_id} is gated: accept its terms and set HF_TOKEN") from error
    except HfHubHTTPError as error:
        raise RegistryError(f"Hugging Face answered an error for {repo_id}: {error}") from error
    except httpx.TransportError as error:
        raise RegistryError(f"cannot reach Hugging Face at {endpoint}: {error}") from error
    plan = plan_repository(files, quant)
    total = sum(f.lfs.size if f.lfs else f.size for f in plan.files)
    tracker = TransferProgress(emit, mode="pull", total=total)
    downloader = _HubDownloader(repo_id, commit, endpoint, token, store, tracker, stop)
    contents: dict[str, bytes] = {}
    downloaded = _Downloaded()
    try:
        with transfer_pool(PARALLEL_FILES) as pool:
            futures = {file.path: pool.submit(downloader.fetch, file) for file in plan.files}
            try:
                for path, future in futures.items():
                    digest, data = future.result()
                    downloaded.digests[path] = digest
                    if data is not None:
                        contents[path] = data
            except BaseException:
                stop.set()  # the other downloads stop at their next chunk
                raise
    finally:
        downloader.close()
    template: str | None = None
    if plan.template_file is not None:
        template = contents[plan.template_file.path].decode("utf-8", errors="replace")
    elif plan.tokenizer_config is not None:
        template = chat_template_from_tokenizer_config(contents[plan.tokenizer_config.path])
    model_id = _package(store, plan, downloaded, template, familiar, _created(info))
    return model_id


def _package(
    store: Store,
    plan: RepoPlan,
    downloaded: _Downloaded,
    template: str | None,
    tag: str,
    created: datetime | None,
) -> str:
    """Build the artifact from the downloaded blobs with the packaging module.

    The blobs are hard-linked under their repository paths in a scratch folder
    inside the store (packaging reads shard names and relative paths from there);
    `created` is the repository's last change, so a re-pull gives the same ID.
    """
    from dmr.distribution import packaging
    from dmr.distribution.packaging import PackageOptions

    store.layout.tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store.layout.tmp_dir, prefix="hf-") as scratch:
        root = Path(scratch).absolute()
        # Each blob was verified as it was written: packaging takes its digest rather
        # than reading the whole file a second time.
        verified: dict[Path, str] = {}

        def place(file: RepoFile, under: str = "") -> Path:
            relative = safe_relative_path(file.path)
            target = root / under / relative if under else root / relative
            digest = downloaded.digests[file.path]
            link_or_copy(store.blob_path(digest), target)
            verified[target] = digest
            return target

        template_path: Path | None = None
        if template is not None:
            template_path = root / "extras" / "template.jinja"
            template_path.parent.mkdir(parents=True, exist_ok=True)
            template_path.write_text(template)
        if plan.format == "gguf":
            weights = [place(file, "weights") for file in plan.weights]
            mmproj = place(plan.mmproj, "extras") if plan.mmproj is not None else None
            options = PackageOptions(
                chat_template=template_path,
                mmproj=mmproj,
                created=created,
                verified_digests=verified,
            )
            artifact = packaging.package_gguf(weights, options)
        else:
            for file in (*plan.weights, *plan.extras):
                place(file, "model")
            options = PackageOptions(created=created, verified_digests=verified)
            artifact = packaging.package_safetensors_dir(root / "model", options)
        model = packaging.write_to_store(store, artifact, [tag])
    return str(model.id)


HF_SOURCE = ModelSource(
    name="huggingface",
    prefixes=(f"{HUGGINGFACE_REGISTRY}/",),
    puller=ThreadedPuller(_pull_blocking),
)


@hookimpl
def dmr_model_sources() -> Sequence[ModelSource]:
    return [HF_SOURCE]
