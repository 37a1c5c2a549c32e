"""The /models routes against a real server: shapes, errors, hostile tarballs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from tests.fixtures.server import DmrServer
from tests.fixtures.store import SMOLLM2_TAG


def _tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _store_files(server: DmrServer) -> set[str]:
    return {
        str(p.relative_to(server.models_path))
        for p in server.models_path.rglob("*")
        if p.is_file() and not p.name.endswith(".lock")
    }


def test_smollm2_server_fixture_lists_the_model(smollm2_server: DmrServer) -> None:
    with smollm2_server.client() as client:
        models = client.get("/models").json()
        assert [m["tags"] for m in models] == [[SMOLLM2_TAG]]
        one = client.get("/models/smollm2").json()  # bare-name fallback
        assert one["id"] == models[0]["id"] and one["config"]["format"] == "gguf"
        assert client.get(f"/models/{one['id'][7:19]}").json()["id"] == one["id"]
        assert client.get(f"/models/{one['id']}").json()["id"] == one["id"]
        hub = client.get("/models/hf.co/org/repo?remote=true")  # reads OCI registries only
        assert hub.status_code == 400 and "Hugging Face" in hub.json()["error"]["message"]
        assert client.get("/engines/df").json()["models_disk_usage"] > 90_000_000


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "words"),
    [
        ("GET", "/models/no/such:thing", None, 404, "not found"),
        ("GET", "/models/Bad%20Name", None, 400, "invalid"),
        ("GET", "/models/a/..%2F..%2Fetc", None, 400, "invalid"),
        ("DELETE", "/models/no/such:thing", None, 404, "not found"),
        ("POST", "/models/create", b"{not json", 400, "not valid json"),
        ("POST", "/models/create", b"{}", 400, "from"),
        ("POST", "/models/create", b'{"from": "../../etc"}', 400, "invalid"),
        ("POST", "/models/no/such:thing/push", b"{}", 404, "not found"),
        ("POST", "/models/ai/smollm2/repackage", b"[1]", 400, "json object"),
        ("POST", "/models/ai/smollm2/repackage", b'{"target": "x/y:1", "context_size": -1}', 400,
         "context_size"),
        ("POST", "/models/ai/smollm2/tag", None, 400, "repo"),
        ("POST", "/models/ai/smollm2/tag?repo=UPPER..bad&tag=x", None, 400, "invalid"),
    ],
)  # fmt: skip
def test_bad_requests_get_clear_errors(
    smollm2_server: DmrServer, method: str, path: str, body: bytes | None, status: int, words: str
) -> None:
    before = _store_files(smollm2_server)
    with smollm2_server.client() as client:
        response = client.request(method, path, content=body)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]["message"].lower()
    assert _store_files(smollm2_server) == before


def test_hostile_tarballs_are_refused_and_change_nothing(smollm2_server: DmrServer) -> None:
    blob = b"hello"
    good_hex = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    link = tarfile.TarInfo("blobs/sha256/" + good_hex)
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "config": {
                "mediaType": "application/vnd.unknown.config+json",
                "digest": "sha256:" + good_hex,
                "size": 5,
            },
            "layers": [],
        }
    ).encode()
    # A v0.2 layer whose annotated path would land outside the bundle.
    escaping_manifest = json.dumps(
        {
            "schemaVersion": 2,
            "config": {
                "mediaType": "application/vnd.docker.ai.model.config.v0.2+json",
                "digest": "sha256:" + good_hex,
                "size": 5,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.docker.ai.model.file",
                    "digest": "sha256:" + good_hex,
                    "size": 5,
                    "annotations": {"org.cncf.model.filepath": "../../../../tmp/pwned"},
                }
            ],
        }
    ).encode()
    cases = [
        (_tar([(tarfile.TarInfo("../escape"), blob)]), 400, "unsafe"),
        (_tar([(tarfile.TarInfo("/etc/cron.d/x"), blob)]), 400, "unsafe"),
        (_tar([(link, None)]), 400, "symlink"),
        (_tar([(tarfile.TarInfo("blobs/sha256/" + "0" * 64), blob)]), 400, "does not match"),
        (_tar([(tarfile.TarInfo("notes.txt"), blob)]), 400, "unexpected entry"),
        (_tar([(tarfile.TarInfo("blobs/sha256/" + good_hex), blob)]), 400, "no manifest"),
        (_tar([(tarfile.TarInfo("blobs/sha256/" + good_hex), blob)])[:600], 400, "truncated"),
        (
            _tar(
                [
                    (tarfile.TarInfo("blobs/sha256/" + good_hex), blob),
                    (tarfile.TarInfo("manifest.json"), manifest),
                ]
            ),
            422,
            "unsupported",
        ),
        (b"not a tarball at all" * 40, 400, "invalid tarball"),
        (
            _tar(
                [
                    (tarfile.TarInfo("blobs/sha256/" + good_hex), blob),
                    (tarfile.TarInfo("manifest.json"), escaping_manifest),
                ]
            ),
            400,
            "unsafe file path",
        ),
    ]
    before = _store_files(smollm2_server)
    with smollm2_server.client() as client:
        for body, status, words in cases:
            response = client.post("/models/load", content=body)
            assert response.status_code == status, response.text
            assert words in response.json()["error"]["message"].lower(), response.text
            assert _store_files(smollm2_server) == before, words
        assert len(client.get("/models").json()) == 1


def test_load_accepts_a_body_larger_than_the_request_cap(
    smollm2_server: DmrServer, tmp_path: Path
) -> None:
    # The export is ~98 MB, far past the 10 MiB cap of other routes.
    with smollm2_server.client() as client:
        with client.stream("GET", f"/models/{SMOLLM2_TAG}/export") as exported:
            assert exported.headers["content-type"] == "application/x-tar"
            tarball = tmp_path / "smollm2.tar"
            with tarball.open("wb") as out:
                for chunk in exported.iter_bytes():
                    out.write(chunk)
        with tarfile.open(tarball) as archive:
            names = archive.getnames()
        assert "manifest.json" in names and all(
            n in {"blobs", "blobs/sha256", "manifest.json"} or n.startswith("blobs/sha256/")
            for n in names
        )

        def chunks() -> object:
            with tarball.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    yield chunk

        loaded = client.post("/models/load?tag=copy/smol:v1", content=chunks())  # type: ignore[arg-type]
        assert loaded.status_code == 201, loaded.text
        # Same bytes as the fixture's model: same ID, one more tag.
        assert set(loaded.json()["tags"]) == {SMOLLM2_TAG, "copy/smol:v1"}
        too_big = client.post("/models/ai/smollm2/repackage", content=b"x" * (11 << 20))
        assert too_big.status_code == 413
        tagged = client.post("/models/copy/smol:v1/tag?repo=copy/smol&tag=v2")
        assert tagged.status_code == 201 and tagged.json()["target"] == "copy/smol:v2"
        conflict = client.delete(f"/models/{loaded.json()['id']}")
        assert conflict.status_code == 409 and "must be forced" in conflict.text
        for tag in ("copy/smol:v1", "copy/smol:v2"):
            assert client.delete(f"/models/{tag}").json() == [{"Untagged": tag}]
        assert [m["tags"] for m in client.get("/models").json()] == [[SMOLLM2_TAG]]
