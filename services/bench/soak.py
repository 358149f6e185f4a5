"""`proxmo bench soak`: memory of every process of a bounded training run, over time.

Runs ``proxmo train`` on a config (the quick start by default) for ``--minutes``
and meanwhile samples, every ``--interval`` seconds, the RSS and PSS of every
process of the run: this driver and all its descendants (raylet, GCS, dashboard,
each Ray actor, the vLLM engine core, the game JVMs, the embedded redis-server).
PSS (proportional set size) is the honest number for forked workers that share
pages; RSS double counts them. USS (unique set size) is a process's private memory.
The headline slope is fitted on USS: a process that reads objects from Ray's shared
object store (the Serve replica reading each weight payload) maps more and more of
that store's pages, so its PSS rises while no memory is allocated anywhere
(measured: a reader of 150 successive 4 MB objects went 76 -> 183 MB PSS with USS
flat at 60 MB). Both slopes are printed.

Output, in ``--out``: ``soak_memory.csv`` (one row per process per sample),
``soak_memory.png`` (PSS per process and the total), ``soak_summary.json``.
Per process, over the second half of the run, where start-up (engine load, caches,
JIT) has settled, two slopes (MB per minute) are fitted: the *trend*, a Theil-Sen
line (the median of the slopes between all pairs of samples), which a few transient
peaks do not move (the learner's allocator peaks during an update, then returns to
its floor: measured +300 MB for one sample), and the least-squares slope, which
they do. Processes seen in fewer than half of those samples (replaced workers) are
reported but not fitted.

Last line: ``soak_max_growth_mb_per_min=<x>``, the largest per-process USS trend;
the lines before it give the PSS trend and the least-squares USS slope.
``--reanalyse DIR`` prints the same table for an earlier soak's files.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("proxmo.soak")

MB = 1024.0 * 1024.0


@dataclass
class Sample:
    t_s: float
    pid: int
    label: str
    rss_mb: float
    pss_mb: float
    uss_mb: float = float("nan")  # private memory; nan where the OS does not give it


def label_of(proc, me: int) -> str:
    """A stable, readable name: ray::<Actor>, raylet, gcs_server, redis-server, VLLM::EngineCore, java..."""
    if proc.pid == me:
        return "driver"
    try:
        cmd = proc.cmdline()
        name = proc.name()
    except Exception:  # gone or not ours
        return "?"
    first = cmd[0] if cmd else name
    if first.startswith(("ray::", "VLLM::")):
        head = first.split()[0]
        return head.split(".")[0] if head.startswith("ray::") else head
    base = os.path.basename(first)
    if base.startswith("python") and len(cmd) > 1:
        script = next((c for c in cmd[1:] if c.endswith(".py")), "")
        if script:
            return os.path.basename(script).removesuffix(".py")
    return base or name


class MemorySampler:
    """Samples this process and all its descendants in a background thread."""

    def __init__(self, interval_s: float = 5.0) -> None:
        import psutil

        self._psutil = psutil
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soak-sampler", daemon=True)
        self.t0 = time.monotonic()

    def start(self) -> MemorySampler:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 30)

    def sample_once(self) -> int:
        me = os.getpid()
        root = self._psutil.Process(me)
        procs = [root] + root.children(recursive=True)
        t = time.monotonic() - self.t0
        n = 0
        for p in procs:
            try:
                info = p.memory_full_info()
                pss = getattr(info, "pss", info.rss)
                uss = getattr(info, "uss", float("nan") * MB)
            except (self._psutil.NoSuchProcess, self._psutil.ZombieProcess):
                continue
            except self._psutil.AccessDenied:
                try:
                    info = p.memory_info()
                    pss, uss = info.rss, float("nan") * MB
                except Exception:
                    continue
            self.samples.append(Sample(round(t, 2), p.pid, label_of(p, me), info.rss / MB, pss / MB, uss / MB))
            n += 1
        return n

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample_once()
            except Exception as exc:  # sampling must never take the run down
                log.warning("memory sample failed: %s", exc)
            self._stop.wait(self.interval_s)


# ---------------------------------------------------------------------- analysis


def _slope_per_min(ts: list[float], ys: list[float]) -> float:
    import numpy as np

    if len(ts) < 3 or max(ts) - min(ts) <= 0:
        return float("nan")
    return float(np.polyfit(np.asarray(ts) / 60.0, np.asarray(ys), 1)[0])


def _trend_per_min(ts: list[float], ys: list[float]) -> float:
    """Theil-Sen slope: the median of the pairwise slopes (robust to a minority of outlying samples)."""
    import numpy as np

    t, y = np.asarray(ts, float) / 60.0, np.asarray(ys, float)
    if len(t) < 3 or t.max() - t.min() <= 0:
        return float("nan")
    i, j = np.triu_indices(len(t), k=1)
    dt = t[j] - t[i]
    keep = dt > 0
    return float(np.median((y[j] - y[i])[keep] / dt[keep]))


def analyse(samples: list[Sample], metric: str = "pss_mb", t_from: float = 0.0) -> dict[str, Any]:
    """Per process: first/last/peak MB and the slopes (trend, least squares) over the second half of [t_from, end]."""
    if not samples:
        raise ValueError("no memory samples were taken")
    t_end = max(s.t_s for s in samples)
    half = t_from + (t_end - t_from) / 2.0
    times_2nd = sorted({s.t_s for s in samples if s.t_s >= half})
    by_pid: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        by_pid[s.pid].append(s)
    procs = []
    for pid, rows in by_pid.items():
        labels = Counter(r.label for r in rows if r.label not in ("ray::IDLE", "?"))
        label = labels.most_common(1)[0][0] if labels else rows[0].label
        late = [r for r in rows if r.t_s >= half]
        fitted = len(late) >= max(3, len(times_2nd) // 2)
        xs, ys = [r.t_s for r in late], [getattr(r, metric) for r in late]
        slope = _slope_per_min(xs, ys) if fitted else float("nan")
        trend = _trend_per_min(xs, ys) if fitted else float("nan")
        procs.append({"pid": pid, "label": label, "samples": len(rows),
                      "first_mb": round(getattr(rows[0], metric), 1), "last_mb": round(getattr(rows[-1], metric), 1),
                      "peak_mb": round(max(getattr(r, metric) for r in rows), 1),
                      "slope_mb_per_min": None if slope != slope else round(slope, 3),
                      "trend_mb_per_min": None if trend != trend else round(trend, 3)})
    totals: dict[float, float] = defaultdict(float)
    for s in samples:
        totals[s.t_s] += getattr(s, metric)
    late_t = [t for t in sorted(totals) if t >= half]
    total_trend = _trend_per_min(late_t, [totals[t] for t in late_t])  # the sum of all processes
    fitted = [p["slope_mb_per_min"] for p in procs if p["slope_mb_per_min"] is not None]
    trends = [p["trend_mb_per_min"] for p in procs if p["trend_mb_per_min"] is not None]
    return {"metric": metric, "duration_min": round((t_end - t_from) / 60.0, 2), "samples": len(sorted(totals)),
            "fit_from_min": round(half / 60.0, 2), "start_min": round(t_from / 60.0, 2),
            "processes": sorted(procs, key=lambda p: -p["peak_mb"]),
            "total_first_mb": round(totals[min(totals)], 1), "total_last_mb": round(totals[max(totals)], 1),
            "total_slope_mb_per_min": None if total_trend != total_trend else round(total_trend, 3),
            "max_growth_mb_per_min": round(max(trends), 3) if trends else float("nan"),
            "max_lsq_growth_mb_per_min": round(max(fitted), 3) if fitted else float("nan")}


def write_csv(samples: list[Sample], path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["t_s", "pid", "label", "rss_mb", "pss_mb", "uss_mb"])
        for s in samples:
            w.writerow([s.t_s, s.pid, s.label, f"{s.rss_mb:.2f}", f"{s.pss_mb:.2f}", f"{s.uss_mb:.2f}"])


def plot(samples: list[Sample], summary: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metric = summary["metric"]
    labels = {p["pid"]: p["label"] for p in summary["processes"]}
    by_pid: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        by_pid[s.pid].append(s)
    fig, (ax, ax_total) = plt.subplots(2, 1, figsize=(11, 8), sharex=True, height_ratios=[3, 1])
    for pid, rows in sorted(by_pid.items(), key=lambda kv: -max(getattr(r, metric) for r in kv[1])):
        ax.plot([r.t_s / 60 for r in rows], [getattr(r, metric) for r in rows], label=f"{labels[pid]} ({pid})", lw=1)
    totals: dict[float, float] = defaultdict(float)
    for s in samples:
        totals[s.t_s] += getattr(s, metric)
    ts = sorted(totals)
    ax_total.plot([t / 60 for t in ts], [totals[t] for t in ts], color="k")
    half = summary["fit_from_min"]
    for a in (ax, ax_total):
        a.axvline(half, color="grey", ls=":", lw=1)
    ax.set_ylabel(f"{metric.removesuffix('_mb').upper()} (MB)")
    ax.set_title(f"memory per process; slopes fitted right of the dotted line; max "
                 f"{summary['max_growth_mb_per_min']} MB/min")
    ax.legend(fontsize=6, ncol=3, loc="upper left")
    ax_total.set_ylabel("total (MB)")
    ax_total.set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- the run


class _SoakDone(Exception):
    """Raised between iterations when the soak time is up (ends train() without its final eval)."""


def _soak_run_class():
    from services.driver import TrainingRun

    class SoakRun(TrainingRun):
        """A TrainingRun that stops between iterations at a deadline."""

        deadline = float("inf")
        iterations_done = 0

        def autoscale(self, m: dict[str, float]) -> None:
            super().autoscale(m)
            self.iterations_done += 1
            if time.monotonic() >= self.deadline:
                raise _SoakDone()

    return SoakRun


def run_soak(cfg, minutes: float, interval_s: float, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    sampler = MemorySampler(interval_s).start()
    run = _soak_run_class()(cfg)
    t0 = time.monotonic()
    t_train = 0.0
    try:
        run.start()
        run.deadline = time.monotonic() + minutes * 60.0
        t_train = time.monotonic() - sampler.t0
        try:
            run.train()
            log.warning("the run finished its %d iterations before the soak time was up", cfg.iterations)
        except _SoakDone:
            pass
        sampler.sample_once()  # a last sample with everything still up
    finally:
        sampler.stop()
        run.close()
    write_csv(sampler.samples, out / "soak_memory.csv")
    extra = {"iterations": run.iterations_done, "wall_min": round((time.monotonic() - t0) / 60, 2),
             "run_dir": str(run.out), "train_start_s": t_train}
    return summarise(sampler.samples, t_train, out, extra)


def summarise(samples: list[Sample], t_train: float, out: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Analyse PSS and USS, draw the plot and write ``soak_summary.json`` into ``out``."""
    summary = analyse(samples, t_from=t_train)
    private = analyse(samples, metric="uss_mb", t_from=t_train)
    summary.update(uss=private, max_uss_growth_mb_per_min=private["max_growth_mb_per_min"],
                   max_uss_lsq_growth_mb_per_min=private["max_lsq_growth_mb_per_min"],
                   max_pss_growth_mb_per_min=summary["max_growth_mb_per_min"], **extra)
    png = plot(samples, summary, out / "soak_memory.png")
    summary["png"] = str(png) if png else None
    (out / "soak_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def read_csv(path: Path) -> list[Sample]:
    """Samples from a ``soak_memory.csv`` that :func:`write_csv` wrote."""
    with path.open(newline="") as fh:
        return [Sample(float(r["t_s"]), int(r["pid"]), r["label"], float(r["rss_mb"]), float(r["pss_mb"]),
                       float(r["uss_mb"])) for r in csv.DictReader(fh)]


def _print_report(summary: dict[str, Any], out: Path) -> None:
    uss = {p["pid"]: p for p in summary["uss"]["processes"]}
    print(f"{'process':<34} {'pid':>7} {'n':>4} {'first':>8} {'last':>8} {'peak':>8} {'trend':>8} "
          f"{'USS last':>9} {'USS trend':>9} {'USS lsq':>8}  (MB and MB/min; PSS unless marked USS)")

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for p in summary["processes"]:
        u = uss.get(p["pid"], {})
        print(f"{p['label'][:34]:<34} {p['pid']:>7} {p['samples']:>4} {p['first_mb']:>8.1f} {p['last_mb']:>8.1f} "
              f"{p['peak_mb']:>8.1f} {fmt(p['trend_mb_per_min']):>8} {u.get('last_mb', float('nan')):>9.1f} "
              f"{fmt(u.get('trend_mb_per_min')):>9} {fmt(u.get('slope_mb_per_min')):>8}")
    print(f"iterations={summary.get('iterations')} duration_min={summary['duration_min']} samples={summary['samples']} "
          f"total_pss_mb={summary['total_first_mb']}->{summary['total_last_mb']} "
          f"soak_total_growth_mb_per_min={summary['total_slope_mb_per_min']}")
    print(f"csv={out / 'soak_memory.csv'} png={summary['png']}")
    print(f"soak_max_pss_growth_mb_per_min={summary['max_pss_growth_mb_per_min']}")
    print(f"soak_max_lsq_growth_mb_per_min={summary['max_uss_lsq_growth_mb_per_min']}")
    print(f"soak_max_growth_mb_per_min={summary['max_uss_growth_mb_per_min']}")


def _reanalyse(folder: Path) -> int:
    csv_path = folder / "soak_memory.csv"
    if not csv_path.is_file():
        print(f"proxmo bench soak: no {csv_path}", file=sys.stderr)
        return 2
    old = json.loads((folder / "soak_summary.json").read_text()) if (folder / "soak_summary.json").is_file() else {}
    t_train = float(old.get("train_start_s", old.get("start_min", 0.0) * 60.0))
    keep = {k: old[k] for k in ("iterations", "wall_min", "run_dir") if k in old}
    summary = summarise(read_csv(csv_path), t_train, folder, {**keep, "train_start_s": t_train})
    _print_report(summary, folder)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="proxmo bench soak", description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="training time (start-up excluded)")
    ap.add_argument("--config", default="deploy/configs/quickstart.yaml")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between memory samples")
    ap.add_argument("--out", default="runs/soak", help="folder for the CSV, PNG and summary")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides (applied after the soak's own)")
    ap.add_argument("--reanalyse", metavar="DIR", default=None,
                    help="no run: analyse DIR/soak_memory.csv (and DIR/soak_summary.json) of an earlier soak")
    args = ap.parse_args(argv)
    if args.reanalyse:
        return _reanalyse(Path(args.reanalyse))
    if args.minutes <= 0 or args.interval <= 0:
        ap.error("--minutes and --interval must be > 0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from services.config import ConfigError, load_config

    stamp = time.strftime("%Y%m%d-%H%M%S")
    # Enough iterations never to end early; a short before-eval (the soak measures memory, not success).
    own = [f"run_name=soak-{stamp}", "iterations=1000000", "eval_episodes=8", "eval_every=0"]
    try:
        cfg = load_config(args.config, own + list(args.overrides))
    except ConfigError as exc:
        print(f"proxmo bench soak: {exc}", file=sys.stderr)
        return 2
    summary = run_soak(cfg, args.minutes, args.interval, Path(args.out))
    _print_report(summary, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
