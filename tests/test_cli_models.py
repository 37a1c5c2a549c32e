"""`dmr` model commands against a real server: package → ls → inspect → tag →
export → rm → load → inspect, and clear one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

from tests.fixtures.registry import LocalRegistry
from tests.fixtures.server import DmrServer
from tests.test_packaging import tiny_gguf


def test_package_list_inspect_tag_export_rm_load(
    dmr_server_factory: object, smollm2_gguf: Path, tmp_path: Path
) -> None:
    server: DmrServer = dmr_server_factory()  # type: ignore[operator]
    packaged = server.cli(
        "package", "--gguf", str(smollm2_gguf), "--context-size", "2048", "test/smol:v1"
    )
    assert packaged.returncode == 0, packaged.stderr
    listed = json.loads(server.cli("ls", "--json").stdout)
    assert [m["tags"] for m in listed] == [["test/smol:v1"]]
    model_id = listed[0]["id"]
    config = listed[0]["config"]
    assert config["format"] == "gguf" and config["architecture"] == "llama"
    assert config["quantization"] == "Q4_1" and config["context_size"] == 2048
    assert server.cli("ls", "-q").stdout.split() == [model_id[7:19]]
    openai = json.loads(server.cli("ls", "--openai").stdout)
    assert openai["data"][0]["id"] == "test/smol:v1"
    assert "test/smol:v1" in server.cli("ls").stdout

    assert server.cli("tag", "test/smol:v1", "other/name:v2").returncode == 0
    inspected = json.loads(server.cli("inspect", "other/name:v2").stdout)
    assert inspected["id"] == model_id and set(inspected["tags"]) == {
        "test/smol:v1",
        "other/name:v2",
    }
    assert json.loads(server.cli("inspect", "--openai", model_id[7:19]).stdout)["object"] == "model"
    assert "llama" in server.cli("show", "test/smol:v1").stdout

    with server.client() as client:
        exported = client.get("/models/test/smol:v1/export")
    assert exported.status_code == 200
    assert exported.headers["content-type"] == "application/x-tar"
    tarball = tmp_path / "model.tar"
    tarball.write_bytes(exported.content)

    # Deleting by ID with two tags needs -f; by tag it only untags.
    refused = server.cli("rm", model_id)
    assert refused.returncode == 1 and "must be forced" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert "Untagged: other/name:v2" in server.cli("rm", "other/name:v2").stdout
    removed = server.cli("rm", "test/smol:v1")
    assert removed.returncode == 0 and f"Deleted: {model_id}" in removed.stdout
    assert json.loads(server.cli("ls", "--json").stdout) == []
    assert not list((server.models_path / "blobs" / "sha256").glob("[0-9a-f]*[0-9a-f]"))

    with server.client() as client:
        loaded = client.post("/models/load?tag=back/again:v1", content=tarball.read_bytes())
    assert loaded.status_code == 201, loaded.text
    again = json.loads(server.cli("inspect", "back/again:v1").stdout)
    assert again["id"] == model_id  # same bytes, same ID

    missing = server.cli("inspect", "no/such:model")
    assert missing.returncode == 1 and "not found" in missing.stderr
    assert server.cli("df").returncode == 0
    assert server.cli("purge", "-f").returncode == 0
    assert json.loads(server.cli("ls", "--json").stdout) == []


def test_package_is_deterministic_and_repackage(
    dmr_server_factory: object, smollm2_gguf: Path, tmp_path: Path
) -> None:
    server: DmrServer = dmr_server_factory(SOURCE_DATE_EPOCH="1700000000")  # type: ignore[operator]
    env_ids = []
    for name in ("a/one:v1", "a/two:v1"):
        result = server.cli("package", "--gguf", str(smollm2_gguf), name)
        assert result.returncode == 0, result.stderr
        env_ids.append(json.loads(server.cli("inspect", name).stdout)["id"])
    assert env_ids[0] == env_ids[1]
    repackaged = server.cli("package", "--from", "a/one:v1", "--context-size", "512", "a/small:v1")
    assert repackaged.returncode == 0, repackaged.stderr
    small = json.loads(server.cli("inspect", "a/small:v1").stdout)
    assert small["config"]["context_size"] == 512 and small["id"] != env_ids[0]


def test_cli_bad_input_is_one_clear_line(dmr_server: DmrServer, tmp_path: Path) -> None:
    truncated = tmp_path / "bad.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 10)
    for args, expected in (
        (("package", "--gguf", str(truncated), "x/y:z"), "truncated"),
        (("package", "--gguf", str(tmp_path / "nope.gguf"), "x/y:z"), "not a readable file"),
        (("package", "--gguf", str(truncated), "Bad..Name"), "invalid"),
        (("inspect", "../../etc/passwd"), "invalid"),
        (("tag", "x/y:z", "a/b:../c"), "invalid"),
        (("rm", "no/such:model"), "not found"),
    ):
        result = dmr_server.cli(*args)
        assert result.returncode == 1, (args, result.stdout)
        assert expected in result.stderr.lower(), (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert json.loads(dmr_server.cli("ls", "--json").stdout) == []


def test_package_push_sends_the_model_to_a_registry(
    oci_registry: LocalRegistry, dmr_server_factory: object, tmp_path: Path
) -> None:
    server: DmrServer = dmr_server_factory(INSECURE_REGISTRY="true")  # type: ignore[operator]
    gguf = tiny_gguf(tmp_path / "tiny.gguf")
    reference = f"{oci_registry.host}/tests/packaged:v1"
    pushed = server.cli("package", "--gguf", str(gguf), "--push", reference)
    assert pushed.returncode == 0, pushed.stderr
    model_id = json.loads(server.cli("inspect", reference).stdout)["id"]
    assert server.cli("rm", reference).returncode == 0
    pulled = server.cli("pull", reference)
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(server.cli("inspect", reference).stdout)["id"] == model_id
