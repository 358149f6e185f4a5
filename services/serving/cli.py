"""`proxmo serve`: run the policy endpoint on the configured model until interrupted."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="proxmo serve", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="YAML config (the `model` and `serving` sections are used)")
    ap.add_argument("--address", default=None, help="Ray address (default: start a local Ray)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. serving.max_replicas=2")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from services.config import load_config

    cfg = load_config(args.config, args.overrides)
    if not Path(cfg.model.path, "config.json").is_file():
        print(f"proxmo serve: no model at {cfg.model.path!r}; build one with "
              f"`proxmo build-model --out {cfg.model.path}` (or `proxmo sft`)")
        return 2
    import ray

    from services.serving.app import deploy_policy

    ray.init(address=args.address, namespace="proxmo")
    dep = deploy_policy(cfg.model, cfg.serving)
    print(f"policy endpoint ready: {dep.base_url}/v1 (model {cfg.serving.app_name}, "
          f"{cfg.serving.min_replicas}-{cfg.serving.max_replicas} replicas); Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        dep.shutdown()
    return 0
