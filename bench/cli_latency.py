"""How fast the `dmr` CLI answers, and how small and quick to start `dmr serve` is.

Each command runs as a whole process, as a user runs it (the `dmr` console script),
against a running server, in interleaved rounds; the figure is the median wall time.
Beside it: `curl` of the same route (what the HTTP call itself costs) and a bare
`python -c pass` (what any Python CLI pays before its first line). The server
part starts `dmr serve` on a fresh store several times and measures the time from
the process's start to its first answer and its idle RSS, then the RSS after
`dmr package` of the SmolLM2 sample.

    python bench/cli_latency.py [--runs 9] [--starts 3] [--json]

Targets (issue 13): each quick command <= 250 ms, `dmr --help` <= 300 ms, idle
server RSS <= 100 MB fresh and after a package, first answer <= 1.5 s after start.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

COMMAND_TARGET_S = 0.25
HELP_TARGET_S = 0.30
RSS_TARGET_MB = 100.0
FIRST_ANSWER_TARGET_S = 1.5
MODEL = "ai/smollm2"


@dataclass
class CommandFigure:
    command: str
    median_s: float
    curl_median_s: float | None
    target_s: float | None

    @property
    def met(self) -> bool | None:
        return None if self.target_s is None else self.median_s <= self.target_s


@dataclass
class ServerFigures:
    first_answer_s: list[float]
    idle_rss_mb: list[float]
    rss_after_package_mb: float


def _unix_get(socket_path: str, path: str) -> int:
    class Connection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(2)
            self.sock.connect(socket_path)

    connection = Connection("dmr", timeout=2)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def _start_server(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], float]:
    """A fresh `dmr serve`, and seconds from its start to its first 200 on `GET /`."""
    with log.open("ab") as out:
        started = time.perf_counter()
        process = subprocess.Popen(
            [_dmr(), "serve"], env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    deadline = started + 60
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dmr serve exited: see {log}")
        try:
            if _unix_get(env["MODEL_RUNNER_SOCK"], "/") == 200:
                return process, time.perf_counter() - started
        except OSError:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"dmr serve did not answer within 60 s: see {log}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _rss_mb(process: subprocess.Popen[bytes], settle_s: float = 2.0) -> float:
    time.sleep(settle_s)
    return psutil.Process(process.pid).memory_info().rss / 2**20


def _dmr() -> str:
    found = shutil.which("dmr")
    if found is None:
        raise SystemExit("the `dmr` console script is not on PATH: pip install -e .")
    return found


def _timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.decode()[-500:]}")
    return elapsed


def _curl(socket_path: str, method: str, path: str) -> list[str]:
    return ["curl", "-sf", "-o", "/dev/null", "--unix-socket", socket_path, "-X", method,
            f"http://dmr{path}"]  # fmt: skip


def measure_commands(env: dict[str, str], runs: int) -> list[CommandFigure]:
    sock = env["MODEL_RUNNER_SOCK"]
    dmr = _dmr()
    # (label, dmr argv, the route it calls as (method, path) for curl, target)
    cases: list[tuple[str, list[str], tuple[str, str] | None, float | None]] = [
        ("python -c pass", [sys.executable, "-c", "pass"], None, None),
        ("dmr --help", [dmr, "--help"], None, HELP_TARGET_S),
        ("dmr version", [dmr, "version"], ("GET", "/version"), COMMAND_TARGET_S),
        ("dmr ls", [dmr, "ls"], ("GET", "/models"), COMMAND_TARGET_S),
        ("dmr ps", [dmr, "ps"], ("GET", "/engines/ps"), COMMAND_TARGET_S),
        ("dmr status", [dmr, "status"], ("GET", "/engines/status"), COMMAND_TARGET_S),
        ("dmr inspect", [dmr, "inspect", MODEL], ("GET", f"/models/{MODEL}"), COMMAND_TARGET_S),
        ("dmr df", [dmr, "df"], ("GET", "/engines/df"), COMMAND_TARGET_S),
    ]
    times: dict[str, list[float]] = {label: [] for label, *_ in cases}
    curl_times: dict[str, list[float]] = {label: [] for label, *_ in cases}
    times["dmr tag"], times["dmr rm"] = [], []
    curl_times["dmr tag"], curl_times["dmr rm"] = [], []
    has_curl = shutil.which("curl") is not None
    for round_index in range(runs):
        for label, argv, route, _target in cases:
            times[label].append(_timed(argv, env))
            if route and has_curl:
                curl_times[label].append(_timed(_curl(sock, *route), env))
        # tag and rm change the store: each round tags a new name and removes it again.
        name = f"bench/tagged:r{round_index}"
        times["dmr tag"].append(_timed([dmr, "tag", MODEL, name], env))
        times["dmr rm"].append(_timed([dmr, "rm", name], env))
        if has_curl:
            curl_name = f"bench/curl:r{round_index}"
            tag_path = f"/models/{MODEL}/tag?repo=bench/curl&tag=r{round_index}"
            curl_times["dmr tag"].append(_timed(_curl(sock, "POST", tag_path), env))
            curl_times["dmr rm"].append(_timed(_curl(sock, "DELETE", f"/models/{curl_name}"), env))
    targets = {label: target for label, _argv, _route, target in cases}
    targets["dmr tag"] = targets["dmr rm"] = COMMAND_TARGET_S
    return [
        CommandFigure(
            command=label,
            median_s=statistics.median(samples),
            curl_median_s=statistics.median(curl_times[label]) if curl_times[label] else None,
            target_s=targets[label],
        )
        for label, samples in times.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=9, help="rounds over the commands")
    parser.add_argument("--starts", type=int, default=3, help="fresh server starts")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    from dmr.sample_model import ensure_smollm2_gguf

    gguf = ensure_smollm2_gguf()
    with tempfile.TemporaryDirectory(prefix="dmr-clibench-") as tmp:
        env = {
            **os.environ,
            "MODELS_PATH": str(Path(tmp) / "models"),
            "MODEL_RUNNER_SOCK": str(Path(tmp) / "s.sock"),
            "DMR_NO_AUTOSTART": "1",
        }
        env.pop("MODEL_RUNNER_HOST", None)
        env.pop("MODEL_RUNNER_PORT", None)
        log = Path(tmp) / "server.log"
        first_answers, idle_rss = [], []
        for _ in range(args.starts):
            process, first_answer = _start_server(env, log)
            try:
                first_answers.append(first_answer)
                idle_rss.append(_rss_mb(process))
            finally:
                _stop(process)
        process, _ = _start_server(env, log)
        try:
            subprocess.run([_dmr(), "package", "--gguf", str(gguf), MODEL], env=env, check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
            after_package = _rss_mb(process)
            commands = measure_commands(env, args.runs)
        finally:
            _stop(process)
    server = ServerFigures(first_answers, idle_rss, after_package)
    if args.json:
        print(json.dumps({"commands": [asdict(c) for c in commands], "server": asdict(server)}))
        return
    _print(commands, server)


def _print(commands: list[CommandFigure], server: ServerFigures) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    print(f"{'command':<16}{'median ms':>10}{'curl ms':>9}{'target':>8}  met")
    for figure in commands:
        met = {None: "", True: "yes", False: "NO"}[figure.met]
        print(f"{figure.command:<16}{ms(figure.median_s):>10}{ms(figure.curl_median_s):>9}"
              f"{ms(figure.target_s):>8}  {met}")  # fmt: skip
    first = statistics.median(server.first_answer_s)
    idle = statistics.median(server.idle_rss_mb)
    print()
    print(f"server first answer after start: {first:.2f} s (target {FIRST_ANSWER_TARGET_S} s)"
          f"  {'yes' if first <= FIRST_ANSWER_TARGET_S else 'NO'}")  # fmt: skip
    print(f"server idle RSS, fresh: {idle:.0f} MB (target {RSS_TARGET_MB:.0f} MB)"
          f"  {'yes' if idle <= RSS_TARGET_MB else 'NO'}")  # fmt: skip
    after = server.rss_after_package_mb
    print(f"server idle RSS after `dmr package`: {after:.0f} MB"
          f"  {'yes' if after <= RSS_TARGET_MB else 'NO'}")  # fmt: skip


if __name__ == "__main__":
    main()
