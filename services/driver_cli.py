"""The `proxmo train`, `proxmo eval` and `proxmo scale` commands: arguments in, a TrainingRun driven, summary lines out."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import replace

from services.config import ConfigError, TrainConfig, load_config
from services.driver import CONTROL_ACTOR, TrainingRun


def _parse(prog: str, argv: list[str], extra=None) -> tuple[argparse.Namespace, TrainConfig | None]:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--config", default=None, help="YAML config file (dataclass tree of services/config.py)")
    p.add_argument("--resume", action="store_true", help="continue from runs/<run_name>/checkpoints/latest")
    if extra:
        extra(p)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=1e-5 mode=async")
    args = p.parse_args(argv)
    overrides = list(args.overrides) + (["resume=true"] if args.resume else [])
    try:
        return args, load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return args, None


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("py4j", "httpx", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def train_main(argv: list[str]) -> int:
    _, cfg = _parse("proxmo train", argv)
    if cfg is None:
        return 2
    _logging()
    run = TrainingRun(cfg)
    try:
        run.start()
        result = run.train()
    finally:
        run.close()
    print(f"run={run.out} checkpoint={run.out / 'checkpoints' / 'latest'} curve={run.out / 'learning_curve.png'}")
    b, a, n = result["success_before"], result["success_after"], max(result["eval_episodes"], 1)
    paired = result.get("paired")
    if paired and paired["pairs"] > 1:  # same tasks, same sampling seeds: the paired standard error
        diff, se, how = paired["improvement"], paired["standard_error"], f"paired over {int(paired['pairs'])} episodes"
    else:  # standard error of the difference of two independent proportions
        diff, se, how = a - b, math.sqrt((b * (1 - b) + a * (1 - a)) / n), "unpaired"
    print(f"iterations={result.get('iterations', cfg.iterations)} improvement={diff:+.4f} "
          f"standard_error={se:.4f} ({diff / se if se else float('nan'):+.1f} standard errors, {how})")
    print(f"success_before={result['success_before']:.4f} success_after={result['success_after']:.4f} "
          f"eval_episodes={result['eval_episodes']}")
    return 0


def eval_main(argv: list[str]) -> int:
    """Success per task type on held-out tasks, for the model at model.path (or --checkpoint)."""
    def extra(p):
        p.add_argument("--checkpoint", default=None, help="HF folder to evaluate (default: model.path)")

    args, cfg = _parse("proxmo eval", argv, extra)
    if cfg is None:
        return 2
    _logging()
    if args.checkpoint:
        cfg = replace(cfg, model=replace(cfg.model, path=args.checkpoint, tiny=False))
    run = TrainingRun(cfg)
    try:
        run.out.mkdir(parents=True, exist_ok=True)
        run.model_cfg = cfg.model
        run._init_ray()
        run.buffer_url = ""
        run.policy = run._deploy_policy()
        run.pool = run._start_pool()
        from services.envs import make_env

        run._task_env = make_env(cfg.env)
        ev = run.evaluate()
    finally:
        run.close()
    for k, v in sorted(ev.items()):
        print(f"{k}={v:.4f}")
    print(f"success={ev['eval/success_rate']:.4f} eval_episodes={int(ev['eval/episodes'])}")
    return 0


def scale_main(argv: list[str]) -> int:
    """Ask a running `proxmo train` to change its number of rollout workers."""
    p = argparse.ArgumentParser(prog="proxmo scale")
    p.add_argument("--workers", type=int, default=None, help="rollout workers")
    p.add_argument("--replicas", type=int, default=None, help="policy endpoint replicas")
    p.add_argument("--run", default="quickstart", help="run_name of the training run")
    p.add_argument("--address", default="auto", help="Ray address of the cluster the run uses")
    p.add_argument("--namespace", default="proxmo")
    args = p.parse_args(argv)
    import ray

    ray.init(address=args.address, namespace=args.namespace, log_to_driver=False)
    try:
        control = ray.get_actor(f"{CONTROL_ACTOR}-{args.run}")
    except ValueError:
        print(f"proxmo scale: no running training run named {args.run!r} in namespace {args.namespace!r}",
              file=sys.stderr)
        return 1
    if args.workers is None and args.replicas is None:
        print("proxmo scale: give --workers N and/or --replicas N", file=sys.stderr)
        return 2
    asked = []
    if args.workers is not None:
        asked.append(f"workers={ray.get(control.request_workers.remote(args.workers))}")
    if args.replicas is not None:
        asked.append(f"replicas={ray.get(control.request_replicas.remote(args.replicas))}")
    print(f"requested {' '.join(asked)} status={ray.get(control.get_status.remote())}")
    return 0
