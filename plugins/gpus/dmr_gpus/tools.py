"""Running a vendor's command-line tool for a probe: found on PATH (or in the vendor's
usual folder), bounded in time, and every failure one clear `GpuProbeError`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
from collections.abc import Sequence

# A tool that hangs (a wedged driver) must not hold the server's start or `dmr status`.
TOOL_TIMEOUT_SECONDS = 20.0
# How much of a tool's unreadable output an error quotes.
QUOTED_CHARS = 200


class GpuProbeError(RuntimeError):
    """A GPU tool or library is there but failed, or answered what cannot be read."""


def find_tool(name: str, *extra_dirs: str) -> str | None:
    """The tool's path: PATH first, then the vendor's folders (ROCm's /opt/rocm/bin is
    often not on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in extra_dirs:
        found = shutil.which(name, path=folder)
        if found:
            return found
    return None


def quote(text: str) -> str:
    """A short, one-line excerpt of a tool's output for an error message."""
    flat = " ".join(text.split())
    return repr(flat[:QUOTED_CHARS] + ("..." if len(flat) > QUOTED_CHARS else ""))


async def run_tool(argv: Sequence[str], *, limit_seconds: float = TOOL_TIMEOUT_SECONDS) -> str:
    """The tool's stdout. It runs without blocking the server's event loop; a non-zero
    exit, a timeout or a start failure raises `GpuProbeError` naming the command."""
    command = shlex.join([os.path.basename(argv[0]), *argv[1:]])
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as error:
        raise GpuProbeError(f"{command} could not start: {error}") from error
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), limit_seconds)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise GpuProbeError(f"{command} did not answer within {limit_seconds:g} s") from None
    out = stdout.decode(errors="replace")
    if process.returncode != 0:
        err = stderr.decode(errors="replace").strip() or out.strip()
        raise ToolFailedError(command, process.returncode or 0, out, err)
    return out


class ToolFailedError(GpuProbeError):
    """The tool exited non-zero; probes look at `output` to tell "no GPU" from a fault."""

    def __init__(self, command: str, returncode: int, output: str, error: str) -> None:
        super().__init__(f"{command} exited with {returncode}: {quote(error)}")
        self.returncode = returncode
        self.output = output
        self.error = error
