import asyncio, statistics, sys, tempfile, time, contextlib
from pathlib import Path
import httpx
from dmr_served import dmr_served
from busy_neighbour import store_model, llama_server_dmr_args
from llamacpp_concurrency import bench_models
PROMPT = "Write a long story about a lighthouse keeper and the sea."
async def one(client, path, model, tokens, nonce):
    body = {"model": model, "messages": [{"role": "user", "content": f"{nonce} {PROMPT}"}], "max_tokens": tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    t0 = time.perf_counter(); times = []
    async with client.stream("POST", path, json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"content":"' in line.replace(" ", ""):
                times.append(time.perf_counter())
    return (times[0] - t0) * 1000, (len(times) - 1) / (times[-1] - times[0])
async def main(models, rounds, tokens):
    with tempfile.TemporaryDirectory() as temp:
        for name, gguf in bench_models(models):
            async with contextlib.AsyncExitStack() as stack:
                targets = {}
                for t, env in (("dmr", {}), ("dmr-keep", {"DMR_FREE_CORES": "0"})):
                    folder = Path(temp) / name / t
                    store_model(folder / "models", gguf, "ai/bench")
                    base = await stack.enter_async_context(dmr_served(folder, **env))
                    targets[t] = (await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=600)), "/engines/v1/chat/completions", "ai/bench")
                targets["llama-server"] = (await stack.enter_async_context(llama_server_dmr_args(gguf)), "/v1/chat/completions", "x")
                for c, p, m in targets.values():
                    await one(c, p, m, 8, "warm")
                res = {t: ([], []) for t in targets}
                for r in range(rounds):
                    for t, (c, p, m) in targets.items():
                        ttft, rate = await one(c, p, m, tokens, f"r{r}")
                        res[t][0].append(ttft); res[t][1].append(rate)
                for t, (ttfts, rates) in res.items():
                    print(f"{name:12} {t:14} TTFT p50 {statistics.median(ttfts):6.1f} ms  decode {statistics.median(rates):6.1f} tok/s", flush=True)
asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
