"""`proxmo bench buffer`: push + read + ack throughput of the trajectory buffer vs raw XADD.

What is compared, in the same run against the same redis-server:

- **raw XADD** (redis-benchmark style): P producer processes XADD the bytes
  the buffer actually sends for that group (``encode_group`` of the same
  group, encoded before the clock starts) through a client from the same
  ``connect_redis``; nothing reads them.
- **buffer, concurrent** (the headline, as issue 3 defines it): the same P
  processes call ``TrajectoryBuffer.push(GroupRecord)`` (validation, msgpack,
  zstd, the idempotent Lua XADD with its counters) while this process plays
  the learner: ``read`` (XREADGROUP via Lua, decode, validation) and ``ack``
  of every group. Timed from the start signal until the last group is acked.
- **buffer, phased**: the producers push every group with nobody reading
  (push-only rate), then this process reads and acks them all (read+ack-only
  rate). On a machine with few cores the concurrent run makes producer,
  learner and redis-server compete for CPU, which a deployment (rollout
  workers and the learner on their own cores) does not; the phased run shows
  each side alone. ``own cores`` = min(push-only, read+ack-only) rate, the
  pipeline's rate when each side has a core; ``one core`` = both phases back
  to back, the rate when everything shares one core.

What is timed on the producer, and why: what ``RolloutWorker._finish`` does
once a group's last step is played, i.e. ``columnar_group`` (joining the
episodes' step columns into the group's) and ``TrajectoryBuffer.push``
(validation, encoding, zstd, the idempotent XADD). The rollout worker records
each step straight into its episode's columns while it plays
(``EpisodeSteps.add``, replacing the StepRecord it built per turn before), so
those appends happen before the start signal here, as they happen during the
game there. ``--from-steps`` times the earlier record path instead: groups of
StepRecords (one synthetic template copied per group id, built before the
start signal) that push gathers into columns, ~0.45 ms of a realistic group.
Decoding is lazy since issue 3's columnar work: ``decode_group`` validates the
columns and builds no StepRecord until ``episode.steps`` is read, so the
learner here (read + decode + validation + ack, no training) does not pay for
the ~0.6 ms of objects per realistic group that an eager decoder built;
neither does the training learner, which flattens its batch from the columns
(``services.learner.flatten_groups``). ``--build-steps`` makes this learner
read every ``episode.steps`` as well, to measure that eager cost.

Also reported: CPU milliseconds per group of each process (producers,
learner, redis-server from /proc when the server is the embedded one), which
load on the machine disturbs far less than wall time, and ``cpu ratio`` = raw
CPU per group / buffer CPU per group (concurrent run).

Ratios are medians over ``--repeat`` runs; the modes rotate order each repeat
so that background load hits all alike. Process start-up is not timed
(producers wait at a barrier). The last line is ``buffer_vs_raw_xadd=<ratio>``
for the headline scenario: realistic groups (8 episodes x 50 steps, ~1k-token
prompts), one producer, concurrent.
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
MODES = ("raw", "concurrent", "phased")


def _producer(mode: str, url: str, stream: str, spec: dict[str, int], count: int, seed: int,
              ready: Any, start: Any, results: Any, from_steps: bool = False) -> None:
    """One producer process: build its template group, wait at the barrier, then push or XADD."""
    from services.buffer import TrajectoryBuffer, connect_redis
    from services.buffer.synthetic import make_group, replay
    from services.codec import encode_group
    from services.config import BufferConfig
    from services.contracts import columnar_group

    template = make_group(**spec, seed=seed)
    if mode == "raw":
        client = connect_redis(url)
        payload = encode_group(template)
        ready.put(os.getpid())
        start.wait()
        cpu = time.process_time()
        for i in range(count):
            client.xadd(stream, {"gid": f"{seed}-{i}", "pv": 0, "d": payload})
        client.close()
    else:
        buf = TrajectoryBuffer(BufferConfig(stream=stream, max_depth=100_000), url, consumer=f"producer-{seed}")
        gids = [f"{stream}-{seed}-{i}" for i in range(count)]
        if from_steps:  # the StepRecord path: push gathers 400 records into columns
            groups = [dataclasses.replace(template, group_id=gid) for gid in gids]
            ready.put(os.getpid())
            start.wait()
            cpu = time.process_time()
            for g in groups:
                buf.push(g)
        else:  # what RolloutWorker._finish does after a group's last step: join its columns, push
            logs, eps, fields = replay(template)  # the steps as the worker recorded them, while it played
            ready.put(os.getpid())
            start.wait()
            cpu = time.process_time()
            for gid in gids:
                buf.push(columnar_group(logs, eps, **{**fields, "group_id": gid}))
        buf.close()
    results.put((time.time(), time.process_time() - cpu))


def _server_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) of a local process, from /proc; NaN where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return float("nan")


def _drain(learner: Any, want: int, build_steps: bool = False) -> int:
    """Read and ack until ``want`` groups went through (the learner's side of the bench); with
    ``build_steps`` every episode's StepRecords are built too (see the module docstring)."""
    acked = 0
    deadline = time.monotonic() + 600
    while acked < want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench: only {acked} of {want} groups arrived")
        got = learner.read(16, block_ms=2000)
        if build_steps:
            for d in got:
                for e in d.group.episodes:
                    e.steps  # noqa: B018  (builds the episode's StepRecords)
        acked += learner.ack([d.msg_id for d in got])
    stats = learner.stats()
    if stats["produced"] != acked or stats["pending"] or stats["depth"]:
        raise RuntimeError(f"bench: buffer accounting is off: {stats}")
    return acked


def _run_once(mode: str, url: str, server_pid: int | None, size: str, producers: int, groups: int,
              build_steps: bool = False, from_steps: bool = False) -> dict[str, float]:
    """Wall seconds of each phase and CPU seconds of each process for one run of ``mode``."""
    from services.buffer import TrajectoryBuffer, connect_redis
    from services.config import BufferConfig

    ctx = mp.get_context("spawn")
    ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    stream = f"bench:{mode}:{uuid.uuid4().hex[:8]}"
    per = groups // producers
    learner = None if mode == "raw" else TrajectoryBuffer(BufferConfig(stream=stream, max_depth=100_000), url)
    procs = [ctx.Process(target=_producer, args=(mode, url, stream, SIZES[size], per, 1000 * k + 1,
                                                 ready, start, results, from_steps)) for k in range(producers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    srv0, cpu0, t0 = _server_cpu(server_pid), time.process_time(), time.time()
    start.set()
    out: dict[str, float] = {}
    if mode == "concurrent":
        _drain(learner, per * producers, build_steps)
        out["wall_s"] = time.time() - t0
    ends = [results.get(timeout=600) for _ in procs]
    t_push = max(e[0] for e in ends) - t0
    if mode == "raw":
        out["wall_s"] = t_push
    elif mode == "phased":
        t1 = time.time()
        _drain(learner, per * producers, build_steps)
        out.update(push_s=t_push, read_s=time.time() - t1, wall_s=time.time() - t0)
    out.update(producer_cpu_s=sum(e[1] for e in ends), learner_cpu_s=time.process_time() - cpu0,
               server_cpu_s=_server_cpu(server_pid) - srv0)
    for p in procs:
        p.join(timeout=30)
    client = connect_redis(url)
    client.delete(stream, *(f"{stream}:{k}" for k in ("stats", "seen", "seen:t", "dead", "tick")))
    client.close()
    if learner is not None:
        learner.close()
    return out


def _codec(size: str, reps: int = 15) -> dict[str, float]:
    """Per-group wire size and encode/decode time (median of ``reps``), to explain the ratio.
    ``steps_ms``: building every StepRecord of a decoded group (not part of ``decode_ms``)."""
    from services.buffer.synthetic import make_group
    from services.codec import decode_group, encode_group

    g = make_group(**SIZES[size], seed=1)
    enc, dec, steps = [], [], []
    for _ in range(reps):
        t = time.perf_counter()
        data = encode_group(g)
        enc.append(time.perf_counter() - t)
        t = time.perf_counter()
        back = decode_group(data)
        dec.append(time.perf_counter() - t)
        t = time.perf_counter()
        for e in back.episodes:
            e.steps  # noqa: B018
        steps.append(time.perf_counter() - t)
    raw = encode_group(g, compress_min_bytes=1 << 40)
    return {"wire_bytes": len(data), "uncompressed_bytes": len(raw),
            "encode_ms": statistics.median(enc) * 1e3, "decode_ms": statistics.median(dec) * 1e3,
            "encode_min_ms": min(enc) * 1e3, "decode_min_ms": min(dec) * 1e3, "steps_ms": statistics.median(steps) * 1e3}


def _summarize(n: int, runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Medians of one scenario's runs, as rates, ratios and CPU ms per group."""
    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    raw_s, conc_s = med("raw", "wall_s"), med("concurrent", "wall_s")
    push_s, read_s = med("phased", "push_s"), med("phased", "read_s")
    cpu = {f"{mode}_{who}_cpu_ms": med(mode, f"{who}_cpu_s") / n * 1e3
           for mode in ("raw", "concurrent") for who in ("producer", "learner", "server")}
    raw_cpu = cpu["raw_producer_cpu_ms"] + cpu["raw_server_cpu_ms"]
    buf_cpu = sum(cpu[f"concurrent_{who}_cpu_ms"] for who in ("producer", "learner", "server"))
    return {
        "raw_groups_per_s": n / raw_s, "buffer_groups_per_s": n / conc_s, "ratio": raw_s / conc_s,
        "push_only_groups_per_s": n / push_s, "read_ack_only_groups_per_s": n / read_s,
        "own_cores_ratio": raw_s / max(push_s, read_s), "one_core_ratio": raw_s / (push_s + read_s),
        **cpu, "cpu_ratio": raw_cpu / buf_cpu if buf_cpu == buf_cpu and buf_cpu > 0 else float("nan"),
        "runs": runs,
    }


def run(url: str, server_pid: int | None, producers: list[int], groups: dict[str, int],
        repeat: int, build_steps: bool = False, from_steps: bool = False) -> list[dict[str, Any]]:
    rows = []
    for size in groups:
        codec = _codec(size)
        for p in producers:
            n = groups[size] // p * p
            runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
            for r in range(repeat):
                for mode in MODES[r % len(MODES):] + MODES[:r % len(MODES)]:
                    runs[mode].append(_run_once(mode, url, server_pid, size, p, n, build_steps, from_steps))
            s = _summarize(n, runs)
            eps = SIZES[size]["episodes"]
            rows.append({"size": size, "producers": p, "groups": n, **codec, **s,
                         "buffer_episodes_per_s": s["buffer_groups_per_s"] * eps,
                         "buffer_wire_mb_per_s": s["buffer_groups_per_s"] * codec["wire_bytes"] / 1e6,
                         "buffer_logical_mb_per_s": s["buffer_groups_per_s"] * codec["uncompressed_bytes"] / 1e6,
                         "raw_wire_mb_per_s": s["raw_groups_per_s"] * codec["wire_bytes"] / 1e6})
            print(f"  {size:9s} P={p}: buffer {s['buffer_groups_per_s']:8.1f} groups/s, raw XADD "
                  f"{s['raw_groups_per_s']:8.1f}/s, ratio {s['ratio']:.3f} (own cores {s['own_cores_ratio']:.3f}, "
                  f"one core {s['one_core_ratio']:.3f}, cpu {s['cpu_ratio']:.3f})", file=sys.stderr, flush=True)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'size':10s} {'P':>2s} {'groups':>6s} {'wire KB':>8s} {'enc ms':>7s} {'dec ms':>7s} "
            f"{'buf grp/s':>9s} {'raw grp/s':>9s} {'push/s':>8s} {'read/s':>8s} {'ratio':>6s} {'own':>6s} "
            f"{'1core':>6s} {'cpu':>6s}  cpu ms/group buffer (prod+learner+redis) | raw (prod+redis)")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['size']:10s} {r['producers']:2d} {r['groups']:6d} {r['wire_bytes'] / 1e3:8.1f} "
            f"{r['encode_ms']:7.2f} {r['decode_ms']:7.2f} {r['buffer_groups_per_s']:9.1f} "
            f"{r['raw_groups_per_s']:9.1f} {r['push_only_groups_per_s']:8.1f} {r['read_ack_only_groups_per_s']:8.1f} "
            f"{r['ratio']:6.3f} {r['own_cores_ratio']:6.3f} {r['one_core_ratio']:6.3f} {r['cpu_ratio']:6.3f}  "
            f"{r['concurrent_producer_cpu_ms']:.2f}+{r['concurrent_learner_cpu_ms']:.2f}+"
            f"{r['concurrent_server_cpu_ms']:.2f} | {r['raw_producer_cpu_ms']:.2f}+{r['raw_server_cpu_ms']:.2f}"
        )
    lines += [
        "ratio: buffer push+read+ack (producer and learner at the same time) vs raw XADD, groups/s, median of runs",
        "own: min(push-only, read+ack-only) rate vs raw (each side on its own core); "
        "1core: push-only then read+ack-only, back to back",
        "cpu: raw CPU per group / buffer CPU per group, summed over all processes (concurrent run)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="proxmo bench buffer", description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="", help="external Redis URL (default: $REDIS_URL, else an embedded server)")
    ap.add_argument("--producers", default="1,4", help="comma-separated producer process counts")
    ap.add_argument("--realistic-groups", type=int, default=48)
    ap.add_argument("--small-groups", type=int, default=480)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated group sizes out of {list(SIZES)}")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few groups, one repeat")
    ap.add_argument("--build-steps", action="store_true",
                    help="the learner also builds every episode's StepRecords (the eager decode of schema 4 before issue 3's lazy records)")
    ap.add_argument("--from-steps", action="store_true",
                    help="producers push groups of StepRecords, gathered into columns at push (the record "
                         "path before rollout workers recorded steps as columns)")
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    producers = [int(x) for x in args.producers.split(",") if x.strip()]
    if not producers or min(producers) < 1:
        ap.error("--producers needs positive integers")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    sizes = [x.strip() for x in args.sizes.split(",") if x.strip()]
    if not sizes or not set(sizes) <= set(SIZES):
        ap.error(f"--sizes takes names out of {list(SIZES)}, got {args.sizes!r}")
    counts = {"realistic": args.realistic_groups, "small": args.small_groups}
    repeat = args.repeat
    if args.quick:
        counts, repeat = {"realistic": 8, "small": 40}, 1
    groups = {s: counts[s] for s in sizes}
    if min(groups.values()) < max(producers):
        ap.error("need at least as many groups as producers")
    from services.buffer import resolve_redis

    parser = _parser()
    url, server = resolve_redis(args.url, appendfsync="everysec")
    try:
        rows = run(url, server.pid if server is not None else None, producers, groups, repeat, args.build_steps,
                   args.from_steps)
    finally:
        if server is not None:
            server.stop()
    print(_table(rows))
    head = next((r for r in rows if (r["size"], r["producers"]) == HEADLINE), rows[0])
    ratios = [r["ratio"] for r in rows]
    print(f"headline: {head['size']} groups, {head['producers']} producer; "
          f"min ratio over scenarios {min(ratios):.3f}, geometric mean "
          f"{statistics.geometric_mean(ratios):.3f}; load average at the end {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cpus; redis-py reply parser: {parser}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"bench": "buffer", "machine": platform.platform(), "cpus": os.cpu_count(),
                       "loadavg": os.getloadavg(), "redis": "embedded" if server is not None else "external",
                       "build_steps": args.build_steps, "from_steps": args.from_steps, "parser": parser,
                       "headline": {"size": head["size"], "producers": head["producers"]},
                       "buffer_vs_raw_xadd": head["ratio"], "rows": rows}, fh, indent=2)
    # key=value lines for `proxmo bench all`; the last one is the headline
    print(f"buffer_own_cores_vs_raw_xadd={head['own_cores_ratio']:.3f}")
    print(f"buffer_cpu_vs_raw_xadd={head['cpu_ratio']:.3f}")
    print(f"buffer_vs_raw_xadd={head['ratio']:.3f}")
    return 0


def _parser() -> str:
    """Which reply parser redis-py uses: ``hiredis`` (C, when the package is installed) or ``python`` (the default here)."""
    from redis.utils import HIREDIS_AVAILABLE

    return "hiredis" if HIREDIS_AVAILABLE else "python"


if __name__ == "__main__":
    sys.exit(main())
