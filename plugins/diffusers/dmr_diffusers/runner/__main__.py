"""`python -m dmr_diffusers.runner --model DIR|FILE.dduf --socket S --device cpu ...`."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dmr.sdk.runner import serve_runner

from dmr_diffusers.runner.app import RunnerState, create_app


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dmr_diffusers.runner")
    parser.add_argument("--model", required=True, help="diffusers directory or .dduf file")
    parser.add_argument("--socket", required=True, help="unix socket to serve HTTP on")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda:0, mps")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--work-dir", default=None, help="where a DDUF archive is unpacked")
    return parser.parse_args(argv)


def load_into(state: RunnerState, args: argparse.Namespace, on_failure: Callable[[], None]) -> None:
    """Load the pipeline (in a thread, so /health answers 503 meanwhile)."""
    model = Path(args.model)
    try:
        # Imported here: torch takes seconds to import and the socket should be up first.
        from dmr_diffusers.runner.pipeline import load_pipeline

        started = time.monotonic()
        work_dir = Path(args.work_dir) if args.work_dir else None
        state.pipeline = load_pipeline(model, args.device, work_dir)
        state.created = int(time.time())
        print(
            f"loaded {state.pipeline.class_name} from {model.name} on {args.device} "
            f"in {time.monotonic() - started:.1f}s",
            file=sys.stderr,
            flush=True,
        )
    except Exception as error:
        state.load_error = f"failed to load {model.name}: {error}"
        print(state.load_error, file=sys.stderr, flush=True)
        on_failure()  # exit, so the scheduler sees a crash with this message on stderr


async def main_async(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    state = RunnerState(model_name=args.served_model_name or Path(args.model).stem)
    app = create_app(state)
    await serve_runner(app, Path(args.socket), lambda fail: load_into(state, args, fail))
    if state.load_error:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    asyncio.run(main_async(argv))


if __name__ == "__main__":
    main()
