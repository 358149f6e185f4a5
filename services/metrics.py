"""Where training metrics go: the Ray dashboard / Prometheus, TensorBoard, a JSONL log, a PNG.

``ray.util.metrics`` gauges are exported by every Ray node's metrics agent in
Prometheus format, so they show up in the Ray dashboard's Grafana panels and in
any Prometheus that scrapes the cluster (KubeRay: port 8080 of each pod). Names
are ``proxmo_<key>`` with ``/`` and other separators turned into ``_``; keys of
the form ``success_rate/<task_type>`` become the gauge ``proxmo_success_rate``
with the tag ``task_type``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TAGGED_PREFIXES = ("success_rate/",)  # key prefix -> gauge with a task_type tag


def metric_name(key: str) -> str:
    return "proxmo_" + re.sub(r"[^a-zA-Z0-9_]", "_", key).strip("_")


class RayGauges:
    """Lazily created ``ray.util.metrics.Gauge`` per key (no-op when Ray is not running)."""

    def __init__(self, run: str) -> None:
        self.run = run
        self._gauges: dict[str, Any] = {}
        try:
            import ray

            self._enabled = ray.is_initialized()
        except ImportError:
            self._enabled = False

    def _gauge(self, name: str, tag_keys: tuple[str, ...]):
        from ray.util.metrics import Gauge

        if name not in self._gauges:
            self._gauges[name] = Gauge(name, description=f"ProxMO-Ray {name}", tag_keys=("run",) + tag_keys)
        return self._gauges[name]

    def record(self, values: dict[str, float]) -> None:
        if not self._enabled:
            return
        for key, value in values.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            prefix = next((p for p in TAGGED_PREFIXES if key.startswith(p)), None)
            if prefix:
                self._gauge(metric_name(prefix), ("task_type",)).set(
                    float(value), tags={"run": self.run, "task_type": key[len(prefix):] or "all"})
            else:
                self._gauge(metric_name(key), ()).set(float(value), tags={"run": self.run})


class MetricsSink:
    """One call per iteration: ``log(step, metrics)``; ``close()`` writes the learning curve."""

    def __init__(self, out_dir: str | Path, run: str, *, tensorboard: bool = True, ray_metrics: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.history: list[dict[str, float]] = []
        self._jsonl = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._ray = RayGauges(run) if ray_metrics else None
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; TensorBoard logs are off")

    def log(self, step: int, values: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        row = {"step": step, "time": time.time(), **clean}
        self.history.append(row)
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._ray is not None:
            self._ray.record(clean)
        if self._tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def plot(self, path: str | Path | None = None, keys: tuple[str, ...] = ("rollout/success_rate", "eval/success_rate")) -> Path | None:
        """Learning curve PNG of the given keys against the iteration."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path or self.out_dir / "learning_curve.png")
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        drawn = False
        for key in keys:
            pts = [(r["step"], r[key]) for r in self.history if key in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, label=key)
                drawn = True
        if not drawn:
            plt.close(fig)
            return None
        ax.set_xlabel("iteration")
        ax.set_ylabel("success rate")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def close(self) -> Path | None:
        png = self.plot()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        return png
