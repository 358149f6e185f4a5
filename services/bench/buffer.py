"""`proxmo bench buffer`: push + read + ack throughput of the trajectory buffer vs raw XADD.

What is compared, in the same run against the same redis-server:

- **buffer**: P producer processes call ``TrajectoryBuffer.push(GroupRecord)``
  (validation, msgpack, zstd, the idempotent Lua XADD with its counters); the
  main process plays the learner: ``read`` (XREADGROUP via Lua, decode,
  validation) and ``ack`` of every group. Timed from the start signal until the
  last group is acked.
- **raw XADD** (redis-benchmark style): the same P processes XADD the same
  encoded bytes (one payload per process, encoded before the clock starts)
  through a client from the same ``connect_redis``; nothing reads them.

Ratio = buffer groups/s / raw XADD groups/s, per scenario (group size x P),
median over ``--repeat`` runs (buffer and raw alternate, so background load
hits both alike). The last line is ``buffer_vs_raw_xadd=<ratio>`` for the
headline scenario: realistic groups (8 episodes x 50 steps, ~1k-token prompts),
one producer. Process start-up is not timed (producers wait at a barrier).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import uuid
from typing import Any

SIZES: dict[str, dict[str, int]] = {
    "realistic": {"episodes": 8, "steps": 50, "prompt_tokens": 1000, "response_tokens": 24},
    "small": {"episodes": 8, "steps": 5, "prompt_tokens": 200, "response_tokens": 16},
}
HEADLINE = ("realistic", 1)


def _producer(mode: str, url: str, stream: str, spec: dict[str, int], count: int, seed: int,
              ready: Any, start: Any, results: Any) -> None:
    """One producer process: build its template group, wait at the barrier, then push or XADD."""
    from services.buffer import TrajectoryBuffer, connect_redis
    from services.buffer.synthetic import make_group
    from services.config import BufferConfig
    from services.contracts import encode_group

    template = make_group(**spec, seed=seed)
    if mode == "buffer":
        buf = TrajectoryBuffer(BufferConfig(stream=stream, max_depth=100_000), url, consumer=f"producer-{seed}")
        groups = [dataclasses.replace(template, group_id=f"{stream}-{seed}-{i}") for i in range(count)]
        ready.put(os.getpid())
        start.wait()
        for g in groups:
            buf.push(g)
        buf.close()
    else:
        client = connect_redis(url)
        payload = encode_group(template)
        ready.put(os.getpid())
        start.wait()
        for i in range(count):
            client.xadd(stream, {"gid": f"{seed}-{i}", "pv": 0, "d": payload})
        client.close()
    results.put(time.time())


def _run_once(mode: str, url: str, size: str, producers: int, groups: int) -> float:
    """Seconds from the start signal until all groups are acked (buffer) or added (raw)."""
    from services.buffer import TrajectoryBuffer, connect_redis
    from services.config import BufferConfig

    ctx = mp.get_context("spawn")
    ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    stream = f"bench:{mode}:{uuid.uuid4().hex[:8]}"
    per = groups // producers
    learner = TrajectoryBuffer(BufferConfig(stream=stream, max_depth=100_000), url) if mode == "buffer" else None
    procs = [ctx.Process(target=_producer, args=(mode, url, stream, SIZES[size], per, 1000 * k + 1,
                                                 ready, start, results)) for k in range(producers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    t0 = time.time()
    start.set()
    if learner is not None:
        acked = 0
        deadline = time.monotonic() + 600
        while acked < per * producers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"bench: only {acked} of {per * producers} groups arrived")
            got = learner.read(16, block_ms=2000)
            acked += learner.ack([d.msg_id for d in got])
        t_end = time.time()
        stats = learner.stats()
        if stats["produced"] != acked or stats["pending"] or stats["depth"]:
            raise RuntimeError(f"bench: buffer accounting is off: {stats}")
    ends = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    if learner is None:
        t_end = max(ends)
    client = connect_redis(url)
    client.delete(stream, f"{stream}:stats", f"{stream}:seen", f"{stream}:seen:t", f"{stream}:dead")
    client.close()
    if learner is not None:
        learner.close()
    return t_end - t0


def _codec(size: str) -> dict[str, float]:
    """Per-group wire size and encode/decode time (median of 5), to explain the ratio."""
    from services.buffer.synthetic import make_group
    from services.contracts import decode_group, encode_group

    g = make_group(**SIZES[size], seed=1)
    enc, dec = [], []
    for _ in range(5):
        t = time.perf_counter()
        data = encode_group(g)
        enc.append(time.perf_counter() - t)
        t = time.perf_counter()
        decode_group(data)
        dec.append(time.perf_counter() - t)
    raw = encode_group(g, compress_min_bytes=1 << 40)
    return {"wire_bytes": len(data), "uncompressed_bytes": len(raw),
            "encode_ms": statistics.median(enc) * 1e3, "decode_ms": statistics.median(dec) * 1e3}


def run(url: str, producers: list[int], groups: dict[str, int], repeat: int) -> list[dict[str, Any]]:
    rows = []
    for size in SIZES:
        codec = _codec(size)
        eps = SIZES[size]["episodes"]
        for p in producers:
            n = groups[size] // p * p
            t_buf, t_raw = [], []
            for r in range(repeat):
                order = ("buffer", "raw") if r % 2 == 0 else ("raw", "buffer")
                for mode in order:
                    (t_buf if mode == "buffer" else t_raw).append(_run_once(mode, url, size, p, n))
            tb, tr = statistics.median(t_buf), statistics.median(t_raw)
            rows.append({
                "size": size, "producers": p, "groups": n, **codec,
                "buffer_s": tb, "raw_s": tr,
                "buffer_groups_per_s": n / tb, "buffer_episodes_per_s": n * eps / tb,
                "buffer_wire_mb_per_s": n * codec["wire_bytes"] / tb / 1e6,
                "buffer_logical_mb_per_s": n * codec["uncompressed_bytes"] / tb / 1e6,
                "raw_groups_per_s": n / tr, "raw_wire_mb_per_s": n * codec["wire_bytes"] / tr / 1e6,
                "ratio": tr / tb, "buffer_runs_s": t_buf, "raw_runs_s": t_raw,
            })
            print(f"  {size:9s} P={p}: buffer {n / tb:8.1f} groups/s, raw XADD {n / tr:8.1f}/s, "
                  f"ratio {tr / tb:.3f}", file=sys.stderr, flush=True)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'size':10s} {'P':>2s} {'groups':>6s} {'wire KB':>8s} {'enc ms':>7s} {'dec ms':>7s} "
            f"{'buf eps/s':>10s} {'buf MB/s':>9s} {'(logical)':>9s} {'raw grp/s':>10s} {'raw MB/s':>9s} {'ratio':>6s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['size']:10s} {r['producers']:2d} {r['groups']:6d} {r['wire_bytes'] / 1e3:8.1f} "
            f"{r['encode_ms']:7.2f} {r['decode_ms']:7.2f} {r['buffer_episodes_per_s']:10.1f} "
            f"{r['buffer_wire_mb_per_s']:9.1f} {r['buffer_logical_mb_per_s']:9.1f} "
            f"{r['raw_groups_per_s']:10.1f} {r['raw_wire_mb_per_s']:9.1f} {r['ratio']:6.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="proxmo bench buffer", description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="", help="external Redis URL (default: $REDIS_URL, else an embedded server)")
    ap.add_argument("--producers", default="1,4", help="comma-separated producer process counts")
    ap.add_argument("--realistic-groups", type=int, default=48)
    ap.add_argument("--small-groups", type=int, default=480)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a smoke run: few groups, one repeat")
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from services.buffer import resolve_redis

    producers = [int(x) for x in args.producers.split(",") if x.strip()]
    if not producers or min(producers) < 1:
        ap.error("--producers needs positive integers")
    groups = {"realistic": args.realistic_groups, "small": args.small_groups}
    repeat = args.repeat
    if args.quick:
        groups, repeat = {"realistic": 8, "small": 40}, 1
    if min(groups.values()) < max(producers):
        ap.error("need at least as many groups as producers")
    url, server = resolve_redis(args.url, appendfsync="everysec")
    try:
        rows = run(url, producers, groups, repeat)
    finally:
        if server is not None:
            server.stop()
    print(_table(rows))
    head = next(r for r in rows if (r["size"], r["producers"]) == HEADLINE) if HEADLINE[1] in producers else rows[0]
    ratios = [r["ratio"] for r in rows]
    print(f"headline: {head['size']} groups, {head['producers']} producer; "
          f"min ratio over scenarios {min(ratios):.3f}, geometric mean "
          f"{statistics.geometric_mean(ratios):.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"bench": "buffer", "machine": platform.platform(), "cpus": os.cpu_count(),
                       "redis": "embedded" if server is not None else "external",
                       "headline": {"size": head["size"], "producers": head["producers"]},
                       "buffer_vs_raw_xadd": head["ratio"], "rows": rows}, fh, indent=2)
    print(f"buffer_vs_raw_xadd={head['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
