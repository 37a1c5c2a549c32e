"""Helpers shared by the reliability tests: servers with SmolLM2 packaged under
several distinct model IDs, the server's memory, and counters from `/metrics`."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from dmr.distribution.packaging import PackageOptions, package_gguf, write_to_store
from dmr.store import Store, StoredModel

from tests.fixtures.server import DmrServer


def put_smollm2(models_path: Path, gguf: Path, tag: str, created: str) -> StoredModel:
    """SmolLM2 under `tag`; another `created` time gives another model ID (another runner)."""
    artifact = package_gguf([gguf], PackageOptions(created=created))
    return write_to_store(Store.open(models_path), artifact, [tag])


def metric(server: DmrServer, sample: str, default: float | None = None) -> float:
    """One sample of the server's `/metrics`, named with its labels as written there
    (`dmr_scheduler_events_total{event="evictions"}`)."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    found = re.search(rf"^{re.escape(sample)} ([0-9.e+]+)$", text, re.MULTILINE)
    if found is None and default is not None:
        return default  # a labelled counter appears once it has counted something
    assert found, f"{sample} not in /metrics"
    return float(found.group(1))


@dataclass
class RssSampler:
    """Samples the server process's resident memory (runners are other processes)."""

    pid: int
    interval: float = 0.25
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        process = psutil.Process(self.pid)

        def loop() -> None:
            while not self._stop.is_set():
                self.samples.append((time.monotonic(), process.memory_info().rss))
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def peak(self) -> int:
        return max(rss for _, rss in self.samples)

    def median_between(self, start: float, end: float) -> int:
        window = sorted(rss for at, rss in self.samples if start <= at <= end)
        assert window, "no memory samples in that window"
        return window[len(window) // 2]


MIB = 1024 * 1024


def store_problems(models_path: Path) -> list[str]:
    """Everything `models.json` promises that the disk does not hold, checked byte by
    byte: each model's manifest hashes to its ID, its config and layers are complete
    blobs whose bytes hash to their digests, and no tag names two models."""
    problems: list[str] = []
    index = json.loads((models_path / "models.json").read_text())
    blobs = models_path / "blobs" / "sha256"
    seen_tags: dict[str, str] = {}
    for entry in index["models"]:
        model_id = entry["id"]
        manifest_path = models_path / "manifests" / "sha256" / model_id.removeprefix("sha256:")
        if not manifest_path.exists():
            problems.append(f"{model_id}: manifest missing")
            continue
        manifest_bytes = manifest_path.read_bytes()
        if "sha256:" + hashlib.sha256(manifest_bytes).hexdigest() != model_id:
            problems.append(f"{model_id}: manifest does not hash to the ID")
        manifest = json.loads(manifest_bytes)
        for descriptor in [manifest["config"], *manifest["layers"]]:
            blob = blobs / descriptor["digest"].removeprefix("sha256:")
            if not blob.exists():
                problems.append(f"{model_id}: blob {descriptor['digest']} missing")
            elif "sha256:" + _file_sha256(blob) != descriptor["digest"]:
                problems.append(f"{model_id}: blob {descriptor['digest']} corrupt")
        for tag in entry["tags"]:
            if tag in seen_tags:
                problems.append(f"tag {tag} names {seen_tags[tag]} and {model_id}")
            seen_tags[tag] = model_id
    return problems


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def blob_files(models_path: Path) -> tuple[set[str], set[str]]:
    """(complete blob names, partial `.incomplete` names) in the store."""
    blobs = models_path / "blobs" / "sha256"
    if not blobs.exists():
        return set(), set()
    names = {p.name for p in blobs.iterdir() if not p.name.endswith(".lock")}
    partial = {n for n in names if n.endswith(".incomplete")}
    return names - partial, partial
