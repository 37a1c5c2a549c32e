"""Image generation through `dmr serve`: first-image latency and images/s.

    python bench/diffusers_images.py [--images 40] [--steps 4] [--size 64x64]
           [--concurrency 1,4] [--json results.json]

The tiny random Stable Diffusion pipeline of the tests (`dmr_diffusers.testing`) is
written to a temporary folder, packaged into a temporary store and served by a
`dmr serve` left to its own settings: on a machine with a GPU the probe finds it and
the runner uses it (`scripts/gpu-check` runs this on CUDA). Measured:

- first image: from the first request (the runner not yet started) to its answer,
  so it holds the runner's start and the pipeline's load;
- images/s: `--images` requests at each `--concurrency`, after the first;
- the device the runner reported (`/engines/ps`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from dmr_served import dmr_served

MODEL = "ai/tiny-sd"


def _store_pipeline(models_path: Path, folder: Path) -> None:
    from dmr.distribution.packaging import PackageOptions, package_safetensors_dir, write_to_store
    from dmr.store import Store
    from dmr_diffusers.testing import build_tiny_pipeline

    pipeline = build_tiny_pipeline(folder / "pipeline")
    store = Store.open(models_path)
    write_to_store(store, package_safetensors_dir(pipeline, PackageOptions()), [MODEL])


async def _generate(client: httpx.AsyncClient, args: argparse.Namespace, seed: int) -> float:
    started = time.perf_counter()
    answer = await client.post(
        "/engines/v1/images/generations",
        json={
            "model": MODEL,
            "prompt": "a lighthouse at dusk",
            "size": args.size,
            "steps": args.steps,
            "seed": seed,
        },
    )
    answer.raise_for_status()
    if not answer.json()["data"][0].get("b64_json"):
        raise RuntimeError(f"no image in {answer.text[:200]}")
    return time.perf_counter() - started


async def _worker(
    client: httpx.AsyncClient,
    args: argparse.Namespace,
    seeds: Iterator[int],
    latencies: list[float],
) -> None:
    """Generate one image per seed taken from the shared `seeds` until none is left."""
    for seed in seeds:
        latencies.append(await _generate(client, args, seed))


async def measure(args: argparse.Namespace, base: str) -> dict[str, Any]:
    results: dict[str, Any] = {"steps": args.steps, "size": args.size}
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        results["first_image_s"] = round(await _generate(client, args, 0), 3)
        runners = (await client.get("/engines/ps")).json()
        results["runner"] = next((r for r in runners if r.get("model_name") == MODEL), runners)
        results["levels"] = []
        for concurrency in args.concurrency:
            latencies: list[float] = []
            started = time.perf_counter()
            seeds = iter(range(1, args.images + 1))
            await asyncio.gather(
                *(_worker(client, args, seeds, latencies) for _ in range(concurrency))
            )
            wall = time.perf_counter() - started
            results["levels"].append(
                {
                    "concurrency": concurrency,
                    "images": len(latencies),
                    "images_per_s": round(len(latencies) / wall, 2),
                    "latency_p50_ms": round(statistics.median(latencies) * 1000, 1),
                }
            )
    return results


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dmr-bench-images-") as name:
        folder = Path(name)
        _store_pipeline(folder / "models", folder)
        async with dmr_served(folder) as base:
            return await measure(args, base)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--images", type=int, default=40, help="images per concurrency level")
    parser.add_argument("--steps", type=int, default=4, help="inference steps per image")
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.concurrency = [int(part) for part in args.concurrency.split(",")]
    results = asyncio.run(main_async(args))
    print(f"first image (runner start and load included): {results['first_image_s']:.2f} s")
    for level in results["levels"]:
        print(
            f"concurrency {level['concurrency']}: {level['images_per_s']:.2f} images/s, "
            f"latency p50 {level['latency_p50_ms']:.0f} ms ({level['images']} images)"
        )
    print(f"runner: {json.dumps(results['runner'])}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
