"""Time to the first streamed token (issue 30 item 6; goal < 1 s for a 32-token prompt), measured against
the model process a server runs (sae_core/live/pool.py, its own process with its LiveConfig threads), over
its socket as a page worker reads it: from sending the request to the first `token` event, beside the
time to the whole non-streamed answer of the same request (the peer, same run, alternating).

Each repetition continues a different 32-token window of a fixed text (the default continuation of a
prompt is cached by the runtime: a repeated prompt would stream its default reply from the cache), 32
new tokens, greedy, one intervention (the README's demo feature, clamped). The first token waits for the
prompt's forward and one decoding step of the default (unsteered) run.

    .venv/bin/python bench/first_token.py --db sqlite:////tmp/store.db --sae smollm2-135m-L8-topk-8k \\
        [--feature 3758 --value 51 --reps 12 --threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sae_core.config import GenerationConfig, LiveConfig  # noqa: E402
from sae_core.live.pool import LiveClient, ModelPool  # noqa: E402

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, "
    "it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of Darkness, "
    "it was the spring of hope, it was the winter of despair, we had everything before us, we had nothing before us, "
    "we were all going direct to Heaven, we were all going direct the other way. There were a king with a large jaw "
    "and a queen with a plain face, on the throne of England; there were a king with a large jaw and a queen with a fair "
    "face, on the throne of France. In both countries it was clearer than crystal to the lords of the State preserves "
    "of loaves and fishes, that things in general were settled for ever."
)


def windows(n: int, size: int = 32) -> list[str]:
    from sae_core.model import load_model

    tok = load_model("smollm2-135m", "cpu", "float32").tokenizer  # the bundled model's tokenizer, as the model process reads it
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    step = max(1, (len(ids) - size) // n)
    out = [tok.decode(ids[i * step : i * step + size]) for i in range(n)]
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) in (size - 1, size, size + 1) for t in out)
    return out


async def main_async(args: argparse.Namespace) -> None:
    cfg = LiveConfig(live_threads=args.threads, live_nice=0, live_time_limit=120)
    with ModelPool(args.db, cfg) as pool:
        client = LiveClient(pool.socket, poll=0.01)
        start = time.monotonic()
        while (await client.call({"op": "status"}) if os.path.exists(pool.socket) else {"state": "starting"})["state"] != "ready":
            await asyncio.sleep(0.2)
            assert time.monotonic() - start < 300, "the model did not load"
        print(f"model ready after {time.monotonic() - start:.1f} s", flush=True)
        settings = asdict(GenerationConfig(max_new_tokens=32, temperature=0.0, top_p=1.0, seed=0))
        prompts = windows(2 * args.reps)
        first, whole_streamed, whole_plain = [], [], []
        for i in range(args.reps):
            req = {"op": "generate", "sae": args.sae, "interventions": [[args.feature, "clamp", args.value]], "settings": settings}
            t0 = time.perf_counter()
            got_first = None
            async for event in client.stream({**req, "prompt": prompts[2 * i]}):
                if got_first is None and "which" in event:
                    got_first = time.perf_counter() - t0
            whole_streamed.append(time.perf_counter() - t0)
            first.append(got_first)
            t0 = time.perf_counter()
            await client.call({**req, "prompt": prompts[2 * i + 1]})
            whole_plain.append(time.perf_counter() - t0)
            print(f"  {i}: first token {got_first:.3f} s, streamed answer {whole_streamed[-1]:.3f} s, plain answer {whole_plain[-1]:.3f} s",
                  flush=True)  # fmt: skip
    med = statistics.median
    print(f"load average {os.getloadavg()[0]:.1f} (cores {os.cpu_count()}), model-process threads {args.threads}")
    print(f"time to first streamed token: median {med(first):.3f} s, max {max(first):.3f} s  (goal < 1 s)")
    print(f"whole answer (default + steered, 32 new tokens each): streamed {med(whole_streamed):.3f} s, plain {med(whole_plain):.3f} s")
    print(f"first token / plain whole answer: {med(first) / med(whole_plain):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True)
    ap.add_argument("--sae", default="smollm2-135m-L8-topk-8k")
    ap.add_argument("--feature", type=int, default=3758)
    ap.add_argument("--value", type=float, default=51.0)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=LiveConfig().live_threads)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
