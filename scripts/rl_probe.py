"""Offline probe of the RL update on the quick-start task, without Ray, Serve or Redis.

Rollouts are sampled with transformers (the same prompts, parser and env adapters as the
rollout worker), and the update is the project's :class:`services.learner.Learner`. A run
takes minutes instead of a full `proxmo train`, so questions about the update itself can be
answered quickly. BENCHMARKS.md cites the numbers it printed.

    # N iterations of RL, then paired evaluation before/after (same tasks, same seeds)
    .venv/bin/python scripts/rl_probe.py loop --iterations 10 env.action_projection=nearest
    # the warm start alone on those held-out episodes (e.g. near-greedy: sampling.temperature=0.05)
    .venv/bin/python scripts/rl_probe.py eval env.action_projection=nearest
    # one update, then the return on the batch's own tasks at theta, theta + step, theta - step
    .venv/bin/python scripts/rl_probe.py direction --optimizer sgd --lr 0.2 env.action_projection=nearest
    # how much of one batch's gradient is signal (pairwise cosine of independent batches' gradients)
    .venv/bin/python scripts/rl_probe.py snr --batches 6
    # the update alone: committed vs without the shared prefix / duplicate merging / KL term
    .venv/bin/python scripts/rl_probe.py timing

Trailing ``key=value`` arguments override deploy/configs/quickstart.yaml as for `proxmo train`.
The last line is ``RESULT ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.config import load_config  # noqa: E402
from services.contracts import EpisodeRecord, GroupRecord, StepRecord  # noqa: E402
from services.envs import make_env  # noqa: E402
from services.envs.protocol import build_messages, parse_action  # noqa: E402
from services.learner import Learner  # noqa: E402


class Player:
    """Plays batches of episodes with a transformers model, ``slots`` envs at a time."""

    def __init__(self, cfg, tokenizer, slots: int = 64):
        self.cfg, self.tok = cfg, tokenizer
        self.envs = [make_env(cfg.env) for _ in range(slots)]

    def close(self) -> None:
        for e in self.envs:
            e.close()

    def play(self, model, tasks, repeats: int, seed: int) -> list[dict]:
        """``repeats`` episodes of each task; torch's sampler is seeded, so a replay with the same
        weights gives the same episodes (paired evaluation)."""
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        torch.manual_seed(seed)
        flat = [t for t in tasks for _ in range(repeats)]
        done_eps: list[dict] = []
        for c in range(0, len(flat), len(self.envs)):
            live_eps = []
            for env, task in zip(self.envs, flat[c:c + len(self.envs)]):
                obs, info = env.reset(task)
                live_eps.append(dict(env=env, obs=obs, adm=info["admissible_actions"], hist=[], steps=[],
                                     desc=info.get("task_description", ""), done=False, won=False))
            for turn in range(self.cfg.env.max_steps):
                live = [s for s in live_eps if not s["done"]]
                if not live:
                    break
                self._turn(model, live, turn, eos)
            done_eps += live_eps
        return done_eps

    def _turn(self, model, live: list[dict], turn: int, eos: set[int]) -> None:
        cfg, tok = self.cfg, self.tok
        hist = (lambda s: s["hist"][-cfg.env.history:]) if cfg.env.history else (lambda s: [])
        texts = [tok.apply_chat_template(build_messages(s["desc"], hist(s), s["obs"], s["adm"], turn, cfg.env),
                                         tokenize=False, add_generation_prompt=True) for s in live]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=cfg.sampling.max_tokens, do_sample=True,
                                 temperature=cfg.sampling.temperature, top_p=None, top_k=None,
                                 pad_token_id=tok.pad_token_id)
        width = enc["input_ids"].shape[1]
        for s, prompt, attn, row in zip(live, enc["input_ids"], enc["attention_mask"], out[:, width:]):
            resp = row.tolist()
            resp = np.array(resp[:next((k + 1 for k, t in enumerate(resp) if t in eos), len(resp))], np.int32)
            parsed = parse_action(tok.decode(resp, skip_special_tokens=True), cfg.env.max_action_chars)
            anchor, reward, done = s["obs"], 0.0, False
            if parsed.valid:
                r = s["env"].step(parsed.action)
                s["obs"], s["adm"], reward, done = r.observation, r.info["admissible_actions"], r.reward, r.done
                s["won"] |= bool(r.info.get("won"))
                s["hist"].append((anchor, r.info.get("action", parsed.action)))
            else:
                s["hist"].append((anchor, "?"))
            s["steps"].append(StepRecord(observation=anchor, action=parsed.action, reward=reward, valid=parsed.valid,
                                         done=done, prompt_ids=prompt[attn.bool()].numpy().astype(np.int32),
                                         response_ids=resp, logprobs=np.zeros(len(resp), np.float32)))  # recomputed
            s["done"] = done or len(s["steps"]) >= cfg.env.max_steps


def groups_of(tasks, episodes: list[dict], group_size: int) -> list[GroupRecord]:
    return [GroupRecord(task_id=t.task_id, episodes=[EpisodeRecord(steps=e["steps"], won=e["won"])
                                                     for e in episodes[i * group_size:(i + 1) * group_size]])
            for i, t in enumerate(tasks)]


def make_learner(cfg, args) -> Learner:
    # Log-probs are recomputed by the learner: transformers' sampler does not return the policy's.
    lcfg = dataclasses.replace(cfg.learner, recompute_old_logprobs=True, freeze=args.freeze or cfg.learner.freeze)
    learner = Learner(cfg.model.path, lcfg, cfg.algorithm, cfg.loss, temperature=cfg.sampling.temperature)
    if learner.frozen:
        print(f"frozen: {', '.join(learner.frozen)}", flush=True)
    if args.adam_eps:
        for g in learner.optimizer.param_groups:
            g["eps"] = args.adam_eps
    if args.optimizer == "sgd":
        learner.optimizer = torch.optim.SGD(learner.model.parameters(), lr=args.lr or cfg.learner.lr,
                                            momentum=args.momentum)
        learner.scheduler = torch.optim.lr_scheduler.LambdaLR(learner.optimizer, lambda _: 1.0)
    elif args.lr:
        for g in learner.optimizer.param_groups:
            g["lr"] = args.lr
        learner.scheduler.base_lrs = [args.lr] * len(learner.scheduler.base_lrs)
    if args.neg_scale != 1.0:
        compute = learner.advantages

        def scaled(groups):
            rows, adv = compute(groups)
            a = np.asarray(adv.advantages, dtype=np.float64)
            adv.advantages = np.where(a < 0, a * args.neg_scale, a)
            return rows, adv

        learner.advantages = scaled
    return learner


def _paired(before: np.ndarray, after: np.ndarray) -> str:
    d = after - before
    return f"{d.mean():+.3f} (s.e. {d.std(ddof=1) / np.sqrt(len(d)):.3f})"


def _won(episodes: list[dict]) -> np.ndarray:
    return np.array([e["won"] for e in episodes], dtype=float)


def cmd_loop(cfg, args, player: Player) -> str:
    learner = make_learner(cfg, args)
    model, env0 = learner.model, player.envs[0]
    g, n_tasks = cfg.rollout.group_size, cfg.learner.groups_per_batch
    train_tasks = [env0.sample_tasks("train", n_tasks, seed=1000 + it) for it in range(args.iterations)]
    if args.eval_on == "train":  # the run's own tasks: optimisation, not generalisation
        eval_tasks, reps = [t for ts in train_tasks for t in ts], 4
    else:
        eval_tasks, reps = env0.sample_tasks("heldout", args.eval_episodes, seed=7), 1

    def evaluate(tag: str) -> np.ndarray:
        model.eval()
        w = _won(player.play(model, eval_tasks, reps, seed=1234))
        model.train()
        print(f"{tag}: success={w.mean():.3f} over {len(w)} episodes", flush=True)
        return w

    before, t0 = evaluate("before"), time.time()
    for it, tasks in enumerate(train_tasks):
        model.eval()
        eps = player.play(model, tasks, g, seed=it)
        model.train()
        m = learner.update(groups_of(tasks, eps, g))
        print(f"it={it} train_success={_won(eps).mean():.3f} kl={m.get('loss/kl', 0):.3f} "
              f"entropy={m.get('loss/entropy', 0):.3f} grad_norm={m['grad_norm']:.2f} {time.time() - t0:.0f}s", flush=True)
    after = evaluate("after")
    return f"before={before.mean():.3f} after={after.mean():.3f} diff={_paired(before, after)}"


def cmd_eval(cfg, args, player: Player) -> str:
    """The warm start alone on the loop's held-out episodes (same tasks and seeds as its 'before')."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg.model.path).eval()
    tasks = player.envs[0].sample_tasks("heldout", args.eval_episodes, seed=7)
    eps = player.play(model, tasks, 1, seed=1234)
    lengths = np.bincount([len(e["steps"]) for e in eps], minlength=cfg.env.max_steps + 1)[1:]
    return f"success={_won(eps).mean():.3f} episodes={len(eps)} steps_histogram={lengths.tolist()}"


def cmd_direction(cfg, args, player: Player) -> str:
    learner = make_learner(cfg, args)
    model = learner.model
    tasks = player.envs[0].sample_tasks("train", cfg.learner.groups_per_batch, seed=args.task_seed)
    model.eval()
    eps = player.play(model, tasks, cfg.rollout.group_size, seed=0)
    print(f"batch success={_won(eps).mean():.3f}", flush=True)
    theta0 = [p.detach().clone() for p in model.parameters()]
    model.train()
    learner.update(groups_of(tasks, eps, cfg.rollout.group_size))
    model.eval()
    plus = [p.detach().clone() for p in model.parameters()]
    minus = [2 * a - b for a, b in zip(theta0, plus)]  # the same step, the other way
    # --direction-eval heldout: the return on unseen tasks (does the step generalise?) instead of the batch's own
    eval_tasks, reps = tasks, args.eval_repeats
    if args.direction_eval == "heldout":
        eval_tasks, reps = player.envs[0].sample_tasks("heldout", args.eval_episodes, seed=7), 1

    def ret(tag: str, params) -> np.ndarray:
        with torch.no_grad():
            for p, q in zip(model.parameters(), params):
                p.copy_(q)
        w = _won(player.play(model, eval_tasks, reps, seed=4321))
        print(f"{tag}: return={w.mean():.3f}", flush=True)
        return w

    j0, jp, jm = ret("theta", theta0), ret("theta+step", plus), ret("theta-step", minus)
    return (f"J={j0.mean():.3f} J_plus={jp.mean():.3f} diff_plus={_paired(j0, jp)} "
            f"J_minus={jm.mean():.3f} diff_minus={_paired(j0, jm)}")


def cmd_snr(cfg, args, player: Player) -> str:
    """How much of one batch's policy gradient is signal: the gradients of ``--batches`` independent
    batches (same weights, no step taken), and the mean cosine between pairs of them. For gradients
    g_i = g + noise_i, E[g_i . g_j] = |g|^2, so mean pairwise dot / mean squared norm estimates the
    share of the squared norm that the expected gradient accounts for. Printed per module, too.
    The loss is the policy-gradient term alone (no entropy bonus, no KL)."""
    cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, entropy_coef=0.0, kl_coef=0.0))
    learner = make_learner(cfg, args)
    for group in learner.optimizer.param_groups:  # the update's optimizer step must not move the weights
        group["lr"] = 0.0
    learner.scheduler.base_lrs = [0.0] * len(learner.scheduler.base_lrs)
    model, g = learner.model, cfg.rollout.group_size
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads, success = [], []
    for k in range(args.batches):
        tasks = player.envs[0].sample_tasks("train", cfg.learner.groups_per_batch, seed=500 + k)
        model.eval()
        eps = player.play(model, tasks, g, seed=k)
        model.train()
        learner.update(groups_of(tasks, eps, g))  # leaves the (clipped) gradient in .grad
        grads.append(torch.cat([p.grad.flatten() for _, p in named]).clone())
        success.append(_won(eps).mean())
        print(f"batch {k}: success={success[-1]:.3f} grad_norm={float(grads[-1].norm()):.3f}", flush=True)
    grad = torch.stack(grads)
    off = ~torch.eye(len(grads), dtype=torch.bool)

    def share(x: torch.Tensor) -> tuple[float, float]:
        dots = x @ x.T
        return float(dots[off].mean() / dots.diagonal().mean()), float(dots.diagonal().mean())

    modules: dict[str, list] = {}
    at = 0
    for n, p in named:
        key = n.split(".")[2] if ".layers." in n else n.rsplit(".", 1)[0]
        key = f"layer {key}" if key.isdigit() else key
        modules.setdefault(key, []).append(slice(at, at + p.numel()))
        at += p.numel()
    overall, total = share(grad)
    for key, parts in modules.items():
        s, sq = share(torch.cat([grad[:, sl] for sl in parts], dim=1))
        print(f"  {key:28s} signal_share={s:+.3f} of_squared_norm={sq / total:.3f}", flush=True)
    cos = torch.nn.functional.cosine_similarity(grad[:, None], grad[None], dim=-1)[off]
    return (f"batches={len(grads)} success={np.mean(success):.3f} pairwise_cos={float(cos.mean()):.3f} "
            f"signal_share={overall:.3f}")


def cmd_timing(cfg, args, player: Player) -> str:
    """One batch, then ``Learner.update`` on copies of it, twice per variant: the committed update,
    without the shared-prefix forward (``learner.share_prefix=false``), without merging duplicate
    rows too (the plain update), and the committed one without the KL term (``loss.kl_coef=0``)."""
    import copy

    model = make_learner(cfg, args).model.eval()
    tasks = player.envs[0].sample_tasks("train", cfg.learner.groups_per_batch, seed=5)
    groups = groups_of(tasks, player.play(model, tasks, cfg.rollout.group_size, seed=0), cfg.rollout.group_size)
    print(f"batch: {sum(len(e.steps) for g in groups for e in g.episodes)} rows", flush=True)
    variants = {"committed": (cfg.learner.share_prefix, True, cfg.loss.kl_coef), "no_prefix": (False, True, cfg.loss.kl_coef),
                "plain": (False, False, cfg.loss.kl_coef), "no_kl": (cfg.learner.share_prefix, True, 0.0)}
    times: dict[str, list[float]] = {}
    for _ in range(2):
        for name, (share, merge, kl) in variants.items():
            c = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, share_prefix=share),
                                    loss=dataclasses.replace(cfg.loss, kl_coef=kl))
            learner = make_learner(c, args)
            if not merge:  # every row its own forward, as before duplicates were merged
                learner._forward_batches = functools.partial(learner._forward_batches, merge=False)
            t = time.perf_counter()
            learner.update(copy.deepcopy(groups))
            times.setdefault(name, []).append(time.perf_counter() - t)
    for name, ts in times.items():
        print(f"{name}: update " + " / ".join(f"{x:.2f}" for x in ts) + " s", flush=True)
    best = {k: min(v) for k, v in times.items()}
    return (f"committed_vs_plain={best['committed'] / best['plain']:.3f} no_prefix_vs_plain={best['no_prefix'] / best['plain']:.3f} "
            f"no_kl_vs_committed={best['no_kl'] / best['committed']:.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["loop", "direction", "eval", "snr", "timing"])
    p.add_argument("--config", default="deploy/configs/quickstart.yaml")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--eval-on", choices=["heldout", "train"], default="heldout")
    p.add_argument("--eval-episodes", type=int, default=256)
    p.add_argument("--eval-repeats", type=int, default=32, help="direction: episodes per batch task")
    p.add_argument("--task-seed", type=int, default=1000)
    p.add_argument("--direction-eval", choices=["batch", "heldout"], default="batch",
                   help="direction: measure the return on the batch's tasks or on --eval-episodes held-out ones")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="adam: the learner's AdamW")
    p.add_argument("--lr", type=float, default=0.0, help="0: learner.lr")
    p.add_argument("--momentum", type=float, default=0.0, help="sgd only")
    p.add_argument("--freeze", default="", help="comma list of parameter-name substrings not to train")
    p.add_argument("--adam-eps", type=float, default=0.0, help="0: the learner's AdamW default")
    p.add_argument("--neg-scale", type=float, default=1.0, help="multiply negative advantages by this")
    p.add_argument("--batches", type=int, default=6, help="snr: independent batches")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    tok.padding_side = "left"
    player = Player(cfg, tok)
    try:
        commands = {"loop": cmd_loop, "direction": cmd_direction, "eval": cmd_eval, "snr": cmd_snr,
                    "timing": cmd_timing}
        result = commands[args.command](cfg, args, player)
    finally:
        player.close()
    print(f"RESULT {args.command} {' '.join(args.overrides)} {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
