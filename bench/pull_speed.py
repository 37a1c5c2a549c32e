"""`dmr pull` against what the disk and the hash allow: a single-layer artifact from
a registry on 127.0.0.1.

    python bench/pull_speed.py [--size 2G] [--rounds 3] [--no-tty] [--json]

It writes a GGUF of `--size` random bytes (a valid header, one layer), starts the
real `docker-registry` (distribution 2.8) on a free port of 127.0.0.1 and `dmr
serve`, each with its storage under one temp dir (removed at the end), and pushes
the artifact with `dmr package --gguf FILE --push`. Then, in interleaved rounds:

- `curl -s -o FILE` of the layer's blob URL (the network and the page cache);
- `sha256sum FILE` and Python's `hashlib.sha256` over FILE in this process (the
  hash); the faster of the two is the round's sha256 figure;
- `dmr pull` (the CLI, through the server's `POST /models/create`) into an empty
  store: `dmr purge --force` runs first, untimed. The CLI runs on a pseudo-terminal,
  so it draws its progress bars as it does for a user (`--no-tty`: a pipe).

The figure is median(`dmr pull`) / max(median(curl), median(sha256)); the target
(issue 28) is <= 1.25. Run it with the machine otherwise idle: on 2 cores anything
else running moves every figure. It also prints `dmr pull` / median(sha256) alone:
where copying into the page cache is slow (session 27's VM: curl took 2.7-4.7 s
to a file against 1.0-1.5 s to /dev/null for 2 GiB; docs/benchmarks.md), curl's
figure grows, the target's ratio shrinks with it and says little, and this one is
the honest check.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pty
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

TARGET_RATIO = 1.25
REGISTRY_BINARY = "docker-registry"
REPOSITORY = "bench/pull-speed"
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass
class Round:
    curl_s: float = 0.0
    sha256sum_s: float = 0.0
    hashlib_s: float = 0.0
    pull_s: float = 0.0

    @property
    def sha256_s(self) -> float:
        return min(self.sha256sum_s, self.hashlib_s)


@dataclass
class Report:
    size_bytes: int
    tty: bool
    rounds: list[Round] = field(default_factory=list)

    def median(self, name: str) -> float:
        return float(statistics.median(getattr(r, name) for r in self.rounds))

    @property
    def yardstick_s(self) -> float:
        return max(self.median("curl_s"), self.median("sha256_s"))

    @property
    def ratio(self) -> float:
        return self.median("pull_s") / self.yardstick_s

    @property
    def hash_ratio(self) -> float:
        """The pull against the hash alone: the target's figure where writing the file
        costs curl little, and a check where it costs curl much (see the docstring)."""
        return self.median("pull_s") / self.median("sha256_s")


def parse_size(text: str) -> int:
    match = _SIZE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M, 2G, 1048576)")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size < 4096:
        raise argparse.ArgumentTypeError("the artifact needs at least 4096 bytes")
    return size


# ----------------------------------------------------------------------------- setup


def write_gguf(path: Path, size: int) -> None:
    """A GGUF v3 header (no tensors, one metadata string) then random bytes to `size`."""

    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    header += string("general.architecture") + struct.pack("<I", 8) + string("llama")
    header += b"\x00" * (-len(header) % 32)
    generator = random.Random(28)
    with path.open("wb") as out:
        out.write(header)
        left = size - len(header)
        while left:
            count = min(left, 16 << 20)
            out.write(generator.randbytes(count))
            left -= count


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, process: subprocess.Popen[bytes], log: Path, ok: tuple[int, ...]) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited: see {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code in ok:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{process.args!r} did not answer within 60 s: see {log}")


@contextlib.contextmanager
def registry(work: Path) -> Iterator[str]:
    """The registry's `host:port`, as tests/fixtures/registry.py starts it (no auth)."""
    binary = shutil.which(REGISTRY_BINARY) or "/usr/bin/docker-registry"
    if not Path(binary).exists():
        sys.exit("docker-registry is not installed (scripts/install-test-deps)")
    port = free_port()
    (work / "registry").mkdir()
    config = work / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {work / 'registry'}\n"
        "  delete:\n    enabled: true\n"
        "  redirect:\n    disable: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = work / "registry.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for(f"http://127.0.0.1:{port}/v2/", process, log, (200,))
        yield f"127.0.0.1:{port}"
    finally:
        stop(process, group=False)


@contextlib.contextmanager
def dmr_server(work: Path) -> Iterator[dict[str, str]]:
    """`dmr serve` with its store under `work`; yields the environment for the CLI."""
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "MODELS_PATH": str(work / "models"),
            "MODEL_RUNNER_PORT": str(port),
            "MODEL_RUNNER_HOST": f"http://127.0.0.1:{port}",
            "MODEL_RUNNER_LOG_DIR": str(work / "logs"),
            "DOCKER_CONFIG": str(work / "docker-config"),  # no ambient credentials
        }
    )
    for name in ("DOCKER_USERNAME", "DOCKER_PASSWORD", "MODEL_RUNNER_REGISTRY_MIRRORS"):
        env.pop(name, None)
    log = work / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "dmr", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(f"http://127.0.0.1:{port}/", process, log, (200,))
        yield env
    finally:
        stop(process, group=True)


def stop(process: subprocess.Popen[bytes], *, group: bool) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(process.pid, signal.SIGTERM)
            else:
                process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                if group:
                    os.killpg(process.pid, signal.SIGKILL)
                else:
                    process.kill()
            process.wait()


def dmr(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "-m", "dmr", *args], env=env, check=True, capture_output=True)


# ----------------------------------------------------------------------------- measures


def timed(argv: list[str], env: dict[str, str] | None = None, *, tty: bool = False) -> float:
    """Wall seconds of `argv`; with `tty` its output goes to a pseudo-terminal that a
    thread reads (as a terminal would) and drops."""
    if not tty:
        started = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - started
    controller, terminal = pty.openpty()
    drained: list[int] = []

    def drain() -> None:
        with contextlib.suppress(OSError):  # EIO once the child closed its end
            while chunk := os.read(controller, 1 << 16):
                drained.append(len(chunk))

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        started = time.perf_counter()
        completed = subprocess.run(argv, env=env, stdout=terminal, stderr=terminal)
        elapsed = time.perf_counter() - started
    finally:
        os.close(terminal)
        reader.join(timeout=5)
        os.close(controller)
    if completed.returncode:
        raise RuntimeError(f"{argv!r} failed with {completed.returncode}")
    return elapsed


def hashlib_seconds(path: Path) -> float:
    started = time.perf_counter()
    hasher = hashlib.sha256()
    with path.open("rb", buffering=0) as handle:
        while chunk := handle.read(1 << 20):
            hasher.update(chunk)
    return time.perf_counter() - started


def one_round(
    index: int, env: dict[str, str], tag: str, blob_url: str, work: Path, tty: bool
) -> Round:
    figures = Round()
    copy = work / "curl.bin"

    def download_and_hash() -> None:
        copy.unlink(missing_ok=True)
        figures.curl_s = timed(["curl", "-sf", "-o", str(copy), blob_url])
        figures.sha256sum_s = timed(["sha256sum", str(copy)])
        figures.hashlib_s = hashlib_seconds(copy)
        copy.unlink()

    def pull() -> None:
        dmr(env, "purge", "--force")
        figures.pull_s = timed([sys.executable, "-m", "dmr", "pull", tag], env, tty=tty)

    steps = [download_and_hash, pull] if index % 2 == 0 else [pull, download_and_hash]
    for step in steps:
        step()
    return figures


def run(size: int, rounds: int, tty: bool, keep: Path | None) -> Report:
    work = keep or Path(tempfile.mkdtemp(prefix="dmr-pull-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    report = Report(size_bytes=size, tty=tty)
    try:
        weights = work / "weights.gguf"
        write_gguf(weights, size)
        with registry(work) as host, dmr_server(work) as env:
            tag = f"{host}/{REPOSITORY}:latest"
            dmr(env, "package", "--gguf", str(weights), "--push", tag)
            weights.unlink()
            manifest = json.loads(
                subprocess.run(
                    ["curl", "-sf", "-H", "Accept: application/vnd.oci.image.manifest.v1+json",
                     f"http://{host}/v2/{REPOSITORY}/manifests/latest"],
                    check=True, capture_output=True,
                ).stdout
            )  # fmt: skip
            layer = manifest["layers"][0]["digest"]
            blob_url = f"http://{host}/v2/{REPOSITORY}/blobs/{layer}"
            for index in range(rounds):
                figures = one_round(index, env, tag, blob_url, work, tty)
                report.rounds.append(figures)
                print(
                    f"round {index + 1}: curl {figures.curl_s:.2f} s, sha256sum "
                    f"{figures.sha256sum_s:.2f} s, hashlib {figures.hashlib_s:.2f} s, "
                    f"dmr pull {figures.pull_s:.2f} s",
                    file=sys.stderr,
                )
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=2 << 30, help="e.g. 256M, 2G")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-tty", action="store_true", help="CLI output to a pipe")
    parser.add_argument("--keep", type=Path, help="work here and keep it (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    report = run(args.size, args.rounds, not args.no_tty, args.keep)
    if args.json:
        body = asdict(report) | {
            "ratio": report.ratio,
            "hash_ratio": report.hash_ratio,
            "target": TARGET_RATIO,
        }
        print(json.dumps(body, indent=2))
        return
    mib = report.size_bytes / (1 << 20)
    print(f"{mib:.0f} MiB single-layer GGUF, {len(report.rounds)} rounds, medians:")
    for name, label in (
        ("curl_s", "curl -o FILE"),
        ("sha256sum_s", "sha256sum FILE"),
        ("hashlib_s", "hashlib.sha256"),
        ("pull_s", "dmr pull" + (" (tty)" if report.tty else "")),
    ):
        seconds = report.median(name)
        print(f"  {label:<18} {seconds:6.2f} s  {mib / seconds:7.0f} MiB/s")
    verdict = "met" if report.ratio <= TARGET_RATIO else "NOT met"
    print(
        f"dmr pull / max(curl, sha256) = {report.ratio:.2f} (target <= {TARGET_RATIO}: {verdict})"
    )
    print(f"dmr pull / sha256 alone     = {report.hash_ratio:.2f}")


if __name__ == "__main__":
    main()
