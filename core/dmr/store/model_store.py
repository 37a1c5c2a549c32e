"""`Store`: the local model store (docs/compatibility.md §3), readable and writable beside DMR."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dmr.errors import (
    ConflictError,
    InvalidRequestError,
    ModelNotFoundError,
    StoreError,
)
from dmr.reference import InvalidReferenceError, is_model_id, normalize_model_id, parse_reference
from dmr.store.artifact import (
    config_descriptor,
    layers_of,
    normalise_config,
    parse_manifest,
)
from dmr.store.blobs import BlobWriter, copy_into_blobs, put_bytes
from dmr.store.bundle import bundle_file_names, write_bundle
from dmr.store.index import IndexEntry, ModelIndex
from dmr.store.layout import StoreLayout, atomic_write
from dmr.store.models import StoredModel, parse_created

__all__ = ["BlobMissingError", "Store", "normalise_tag"]


class BlobMissingError(StoreError):
    """A blob the new model needs is gone: a delete of another model sharing it
    removed it between the download and `add_model` (the pull downloads again)."""


def normalise_tag(name: str) -> str:
    """The familiar name the index keeps (`smollm2` → `ai/smollm2:latest`)."""
    try:
        reference = parse_reference(name)
    except InvalidReferenceError as error:
        raise InvalidRequestError(str(error)) from error
    if reference.digest:
        raise InvalidRequestError(f"a tag cannot carry a digest: {name!r}")
    return reference.familiar


def _tag_matches(stored: str, wanted: str) -> bool:
    if stored == wanted:
        return True
    try:  # stores written by other tools may keep "docker.io/ai/x:latest" or "x"
        return parse_reference(stored).familiar == wanted
    except InvalidReferenceError:
        return False


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.layout = StoreLayout(root)
        self.index = ModelIndex(self.layout)
        # Manifests and configs never change for a given ID, so parsing them once is safe.
        self._cache: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}

    @classmethod
    def open(cls, root: Path) -> Store:
        root = Path(root).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        store = cls(root)
        store.layout.initialise()
        if not store.layout.index_file.exists():
            with store.index.lock:
                if not store.layout.index_file.exists():
                    store.index.write([])
        return store

    # ------------------------------------------------------------------ reading

    def _load(self, entry: IndexEntry) -> StoredModel | None:
        cached = self._cache.get(entry.id)
        if cached is None:
            try:
                manifest_bytes = self.layout.manifest(entry.id).read_bytes()
                manifest = json.loads(manifest_bytes)
                descriptor = config_descriptor(manifest)
                config = normalise_config(
                    descriptor.media_type,
                    self.layout.blob(descriptor.digest).read_bytes(),
                    layers_of(manifest),
                )
            except FileNotFoundError:
                return None  # deleted under our feet
            except (ValueError, InvalidRequestError):
                return None  # a broken entry must not hide the others
            cached = (manifest, config)
            self._cache[entry.id] = cached
        manifest, config = cached
        descriptor_block = config.get("descriptor")
        created = parse_created(
            descriptor_block.get("created") if isinstance(descriptor_block, dict) else None
        )
        return StoredModel(
            id=entry.id,
            tags=tuple(entry.tags),
            files=tuple(layer.digest for layer in layers_of(manifest)),
            manifest=manifest,
            config=config,
            created=created,
            bundle_dir=self.layout.bundle(entry.id),
        )

    def list_models(self) -> list[StoredModel]:
        models = (self._load(entry) for entry in self.index.read())
        return [model for model in models if model is not None]

    def _resolve(self, entries: list[IndexEntry], name: str) -> tuple[IndexEntry, str | None]:
        """(entry, the tag it was found by, or None when named by ID)."""
        text = name.strip()
        if is_model_id(text):
            wanted = normalize_model_id(text)
            if wanted.startswith("sha256:"):
                for entry in entries:
                    if entry.id == wanted:
                        return entry, None
            else:
                matches = [e for e in entries if e.id.removeprefix("sha256:").startswith(wanted)]
                if len(matches) == 1:
                    return matches[0], None
        try:
            reference = parse_reference(text)
        except InvalidReferenceError as error:
            raise InvalidRequestError(str(error)) from error
        if reference.digest:
            for entry in entries:
                if entry.id == reference.digest:
                    return entry, None
            raise ModelNotFoundError(f"model {name!r} not found")
        wanted_tag = reference.familiar
        for entry in entries:
            for tag in entry.tags:
                if _tag_matches(tag, wanted_tag):
                    return entry, tag
        raise ModelNotFoundError(f"model {name!r} not found")

    def get(self, name: str) -> StoredModel:
        """By tag, bare name (`smollm2`), full or short ID."""
        entry, _ = self._resolve(self.index.read(), name)
        model = self._load(entry)
        if model is None:
            raise ModelNotFoundError(f"model {name!r} not found")
        if not (model.bundle_dir / "config.json").exists():
            # DMR builds bundles lazily, so a store it wrote may have none yet.
            with self.index.lock:
                write_bundle(self.layout, model.id, model.manifest, model.config)
        return model

    def find(self, name: str) -> StoredModel | None:
        try:
            return self.get(name)
        except ModelNotFoundError:
            return None

    def has_blob(self, digest: str) -> bool:
        return self.layout.blob(digest).exists()

    def blob_path(self, digest: str) -> Path:
        return self.layout.blob(digest)

    def manifest_bytes(self, model_id: str) -> bytes:
        try:
            return self.layout.manifest(model_id).read_bytes()
        except FileNotFoundError as error:
            raise ModelNotFoundError(f"model {model_id} not found") from error

    def disk_usage(self) -> int:
        """Bytes used by models, counting each hard-linked file once (runners' prompt
        caches apart: `prompt_cache_usage`)."""
        return _disk_usage(self.root, skip=self.layout.prompt_cache_dir)

    def prompt_cache_usage(self) -> int:
        """Bytes of runners' prompt caches kept across loads."""
        return _disk_usage(self.layout.prompt_cache_dir)

    # ------------------------------------------------------------------ writing blobs

    def blob_writer(self, digest: str, size: int) -> BlobWriter:
        return BlobWriter(self.layout, digest, size)

    def import_file(self, path: Path) -> tuple[str, int]:
        """Copy a file into the blobs (a copy, so editing the source cannot corrupt it)."""
        with Path(path).open("rb") as source:
            return copy_into_blobs(self.layout, source)

    def put_blob_bytes(self, data: bytes) -> str:
        return put_bytes(self.layout, data)

    # ------------------------------------------------------------------ models

    def add_model(self, manifest_bytes: bytes, tags: Iterable[str] = ()) -> StoredModel:
        """Record a model whose blobs are all present; tags move from other models."""
        manifest = parse_manifest(manifest_bytes)
        model_id = "sha256:" + _sha256(manifest_bytes)
        descriptor = config_descriptor(manifest)
        layers = layers_of(manifest)
        bundle_file_names(layers)  # refuse unsafe layer paths before anything is written
        wanted_tags = [normalise_tag(tag) for tag in tags]
        with self.index.lock:
            for blob in [descriptor, *layers]:
                path = self.layout.blob(blob.digest)
                if not path.exists():
                    raise BlobMissingError(
                        f"cannot add model {model_id}: blob {blob.digest} is missing"
                    )
                if path.stat().st_size != blob.size:
                    raise StoreError(
                        f"cannot add model {model_id}: blob {blob.digest} has "
                        f"{path.stat().st_size} bytes, the manifest says {blob.size}"
                    )
            config = normalise_config(
                descriptor.media_type, self.layout.blob(descriptor.digest).read_bytes(), layers
            )
            manifest_path = self.layout.manifest(model_id)
            if not manifest_path.exists():
                atomic_write(manifest_path, manifest_bytes)
            write_bundle(self.layout, model_id, manifest, config)
            entries = self.index.read()
            entry = next((e for e in entries if e.id == model_id), None)
            if entry is None:
                entry = IndexEntry(
                    id=model_id,
                    files=[*(layer.digest for layer in layers), descriptor.digest],
                )
                entries.append(entry)
            self._retag(entries, entry, wanted_tags)
        model = self._load(entry)
        if model is None:
            raise StoreError(f"model {model_id} vanished while it was being added")
        return model

    def _retag(self, entries: list[IndexEntry], target: IndexEntry, tags: list[str]) -> None:
        """Point `tags` at `target` and write the index; models left without a tag by
        the move are dropped with their unshared blobs (a re-pulled `latest` must not
        pile up old copies). Called with the index lock held."""
        orphans: list[IndexEntry] = []
        for tag in tags:
            for other in entries:
                if other is not target and tag in other.tags:
                    other.tags.remove(tag)
                    if not other.tags:
                        orphans.append(other)
            if tag not in target.tags:
                target.tags.append(tag)
        for orphan in orphans:
            entries.remove(orphan)
        self.index.write(entries)
        self._remove_unreferenced(entries, orphans)

    def tag(self, name: str, new_tag: str) -> StoredModel:
        tag = normalise_tag(new_tag)
        with self.index.lock:
            entries = self.index.read()
            entry, _ = self._resolve(entries, name)
            self._retag(entries, entry, [tag])
        model = self._load(entry)
        if model is None:
            raise ModelNotFoundError(f"model {name!r} not found")
        return model

    def untag(self, tag: str) -> None:
        wanted = normalise_tag(tag)
        with self.index.lock:
            entries = self.index.read()
            for entry in entries:
                entry.tags = [t for t in entry.tags if not _tag_matches(t, wanted)]
            self.index.write(entries)

    def delete(self, name: str, force: bool = False) -> list[dict[str, str]]:
        """Docker's semantics: by tag, untag (and delete once no tag is left); by ID,
        delete, refusing a model with several tags unless forced."""
        with self.index.lock:
            entries = self.index.read()
            entry, by_tag = self._resolve(entries, name)
            report: list[dict[str, str]] = []
            if by_tag is not None and len(entry.tags) > 1:
                entry.tags.remove(by_tag)
                self.index.write(entries)
                return [{"Untagged": by_tag}]
            if by_tag is None and len(entry.tags) > 1 and not force:
                raise ConflictError(
                    f"unable to delete {name!r} (must be forced): model is referenced by "
                    f"{len(entry.tags)} tags: {', '.join(entry.tags)}"
                )
            report += [{"Untagged": tag} for tag in entry.tags]
            entries.remove(entry)
            self.index.write(entries)
            self._remove_unreferenced(entries, [entry])
            report.append({"Deleted": entry.id})
            return report

    def _remove_unreferenced(self, remaining: list[IndexEntry], removed: list[IndexEntry]) -> None:
        """Remove the manifests, bundles and blobs of `removed` that no model in
        `remaining` uses. Called under the lock, after the index no longer lists them."""
        if not removed:
            return
        in_use: set[str] = set()
        for entry in remaining:
            in_use.update(entry.files)
            in_use.update(self._manifest_digests(entry.id))
        for entry in removed:
            self._cache.pop(entry.id, None)
            digests = set(entry.files) | self._manifest_digests(entry.id)
            shutil.rmtree(self.layout.bundle(entry.id), ignore_errors=True)
            shutil.rmtree(self.layout.prompt_cache(entry.id), ignore_errors=True)
            self.layout.manifest(entry.id).unlink(missing_ok=True)
            for digest in digests - in_use:
                self.layout.blob(digest).unlink(missing_ok=True)

    def _manifest_digests(self, model_id: str) -> set[str]:
        try:
            manifest = json.loads(self.layout.manifest(model_id).read_bytes())
            return {config_descriptor(manifest).digest} | {
                layer.digest for layer in layers_of(manifest)
            }
        except (FileNotFoundError, ValueError, InvalidRequestError):
            return set()

    def remove_unused_blobs(self, digests: Iterable[str]) -> None:
        """Remove blobs no model references (the leftovers of a refused load)."""
        with self.index.lock:
            in_use: set[str] = set()
            for entry in self.index.read():
                in_use.update(entry.files)
                in_use.update(self._manifest_digests(entry.id))
            for digest in set(digests) - in_use:
                self.layout.blob(digest).unlink(missing_ok=True)

    def purge(self) -> None:
        """Empty the store; refuses a directory that is not a model store."""
        if not self.layout.layout_file.exists():
            raise StoreError(f"refusing to purge {self.root}: no layout.json, not a model store")
        with self.index.lock:
            for directory in ("blobs", "manifests", "bundles", "tmp", "prompt-cache"):
                shutil.rmtree(self.root / directory, ignore_errors=True)
            self._cache.clear()
            self.index.write([])
            self.layout.initialise()


def _disk_usage(root: Path, skip: Path | None = None) -> int:
    """Bytes of the files under `root` but those under `skip`, each hard-linked file once."""
    seen: set[int] = set()
    total = 0
    for path in root.rglob("*"):
        if skip is not None and path.is_relative_to(skip):
            continue
        try:
            stat = path.lstat()
        except FileNotFoundError:
            continue
        if path.is_file() and stat.st_ino not in seen:
            seen.add(stat.st_ino)
            total += stat.st_size
    return total


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
