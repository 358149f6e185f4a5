"""One configuration tree for the whole service.

Every component receives only its own sub-config (STYLE.md 7-8). The tree is
loaded from YAML (or a dict), dotted overrides from the command line are applied
(``learner.lr=1e-5``), and :func:`validate` runs once, before any actor starts.
Unknown keys, wrong types and conflicting values raise :class:`ConfigError`
with the dotted path of the offending field; nothing is silently rewritten.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from proxmo.config import AdvantageConfig, LossConfig


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or inconsistent."""


# --------------------------------------------------------------------------- sub-configs


@dataclass
class EnvConfig:
    """Which text environment the rollout workers run, and how prompts are made."""

    name: str = "textworldexpress"  # registry name or "module:attr"
    game: str = "twc"  # game family / task type inside the environment
    game_params: str = "numLocations=1,numItemsToPutAway=2,includeDoors=0"
    split: str = "train"  # train | dev | test (or valid_seen / valid_unseen)
    max_steps: int = 10  # step cap per episode
    history: int = 2  # last k observation/action pairs in the prompt
    obs_chars: int = 120  # history observations are cut to this many characters
    # The current observation is cut to this many characters (0: whole). The quick start cuts it to 120: on
    # twc the admissible actions already name every object and container, and the shorter prompts made SFT
    # 30% and the learner's update 13% faster on the CPU (BENCHMARKS.md, session 11).
    now_chars: int = 0
    max_action_chars: int = 200  # longer model outputs are invalid
    step_timeout_s: float = 30.0  # an env step slower than this is an infrastructure failure
    # True: a well-formed action that is not in the env's admissible list is also marked invalid, so
    # it gets algorithm.invalid_penalty (the env still plays it). False (paper): only unparsable output.
    # Measured on the quick start (BENCHMARKS.md): with penalty 0.5 the tiny model learned to "look around".
    inadmissible_is_invalid: bool = False
    # "nearest": a well-formed action that is not admissible is replaced by the most similar admissible
    # action (difflib ratio, ties to the earlier listed) before the env plays it, the fallback of LLM
    # planners that ground free text in a fixed action set (Huang et al. 2022). The step records the
    # model's text in info["projected_from"]; the rollout counts it (rollout/projected_action_rate).
    # "none" (paper): the env plays the text as written and usually answers that it did not understand.
    action_projection: str = "none"
    projection_min_ratio: float = 0.0  # below this similarity the text is played as written
    # "index": the prompt numbers the admissible actions ("1 take apple | 2 look around") and the
    # model answers with a number (<action>2</action>), which the env resolves to that action
    # (info["action"]; the rollout records and shows the resolved text). The choice is then one
    # token, as in choice-based text-game agents (DRRN, He et al. 2016), so a small model does not
    # have to spell object names. An answer that is not a listed number is read as text (and
    # projected when action_projection says so). "text" (paper): the model writes the action.
    action_format: str = "text"
    # "success" (paper): WIN_REWARD at the winning step, 0 otherwise. "score": WIN_REWARD times the
    # change of the game's normalised score at every step (TextWorldExpress and WebShop report one
    # in [0, 1]), so an episode earns WIN_REWARD x its final score and a won game still earns
    # WIN_REWARD in all. Success (and ProxMO's success rate) is the game's own won flag either way.
    reward: str = "success"
    data_path: str = ""  # ALFWorld / WebShop data folder (empty: the env's own default)
    options: dict[str, Any] = field(default_factory=dict)  # adapter-specific extras


@dataclass
class ModelConfig:
    """The policy model: a local Hugging Face folder, or the tiny model built here."""

    path: str = "artifacts/tiny-model"  # HF folder; built by `proxmo sft` when missing and tiny=true
    tiny: bool = True  # build the tiny Llama model locally if `path` does not exist
    dtype: str = "float32"
    max_model_len: int = 512
    trust_remote_code: bool = False
    # Shape of the tiny model when it is built (tiny=true and no model at `path`); ~1.08M parameters as set.
    tiny_hidden: int = 128
    tiny_layers: int = 4
    tiny_heads: int = 2
    tiny_intermediate: int = 352


@dataclass
class ServingConfig:
    """Ray Serve deployment of the vLLM policy engine."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0
    num_cpus: float = 0.5  # per replica (fractional on small machines)
    num_gpus: float = 0.0
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.3  # on CPU: fraction of host memory vLLM may reserve
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE on CPU
    # ONEDNN_PRIMITIVE_CACHE_CAPACITY on CPU. oneDNN keeps one compiled GEMM per input shape; its default
    # of 1024 made the vLLM worker grow ~0.5 GB over a 22-minute soak (rollouts give many batch shapes).
    onednn_cache_capacity: int = 64
    enforce_eager: bool = True
    request_timeout_s: float = 120.0
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    app_name: str = "proxmo-policy"
    logprobs_mode: str = "raw_logprobs"  # vLLM: raw_logprobs (temperature-1 distribution) | processed_logprobs
    seed: int = 0  # engine seed (per-request seeds override it)
    swap_drain_timeout_s: float = 30.0  # in-flight requests past this are aborted (marked) by a weight swap
    weight_poll_s: float = 1.0  # replica long-poll period on the WeightStore (also its heartbeat)
    session_affinity: bool = True  # route one episode (session id) to one replica (prefix cache)
    max_ongoing_requests: int = 256  # per replica; the engine batches them (Serve's default of 5 starves it)


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 32
    eval_temperature: float = 0.0


@dataclass
class BufferConfig:
    """Redis Streams trajectory buffer."""

    url: str = ""  # empty: start an embedded redis-server; else redis://[:pw@]host:port/db or rediss://
    stream: str = "proxmo:groups"
    group: str = "learner"
    max_depth: int = 256  # producers wait when this many groups are unconsumed
    push_timeout_s: float = 300.0
    claim_idle_ms: int = 60_000  # pending longer than this is reclaimed from a dead consumer
    max_record_bytes: int = 64 * 1024 * 1024
    compress_min_bytes: int = 4096
    max_staleness: int = 1  # drop groups more than this many policy versions behind
    data_dir: str = ""  # embedded server's AOF folder (empty: a temp dir)
    appendfsync: str = "everysec"  # embedded server's AOF fsync policy: always | everysec | no
    reconnect_timeout_s: float = 30.0  # keep retrying (with backoff) a lost Redis connection this long
    dedupe_window_s: float = 86_400.0  # a re-pushed group_id is recognised for this long


@dataclass
class RolloutConfig:
    num_workers: int = 1
    min_workers: int = 1
    max_workers: int = 4
    envs_per_worker: int = 8  # concurrent episodes per worker (one group = group_size episodes)
    group_size: int = 8  # G episodes per task
    num_cpus: float = 0.25
    autoscale: bool = False  # scale on buffer depth / learner idle time
    resources: dict[str, float] = field(default_factory=dict)  # e.g. {"rollout": 0.01} on KubeRay


@dataclass
class LearnerConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    groups_per_batch: int = 8
    micro_batch_size: int = 16  # rows per forward/backward
    ppo_epochs: int = 1
    ppo_mini_batches: int = 1  # optimizer steps per epoch, each on a random 1/n of the batch's rows
    warmup_steps: int = 0
    device: str = "auto"  # auto | cpu | cuda
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    seed: int = 0
    recompute_old_logprobs: bool = False  # True: old log-probs from the learner, not the sampler
    torch_threads: int = 0  # CPU learner: intra-op threads (0: round(num_cpus), at least 1)
    # Comma-separated substrings of parameter names that the RL update leaves as they are (e.g.
    # "embed_tokens"). Empty: train everything. Every entry must match at least one parameter.
    freeze: str = ""
    # Run the prompt prefix that every row of a micro-batch shares once (system prompt, task); the
    # same values and gradients up to float rounding. About a third of a quick-start update's tokens.
    share_prefix: bool = True


@dataclass
class SFTConfig:
    """Supervised warm start (`proxmo sft`); the run length is set by ``epochs``, ``seconds`` caps it."""

    episodes: int = 1500  # expert episodes to draw demonstrations from
    lr: float = 3e-3
    batch_size: int = 32
    epochs: float = 1.2  # passes over the demonstrations (cosine schedule over this many steps)
    # Hard time cap: stops early (and says so) on a slow machine. The learning-rate schedule follows the
    # step count, so a run repeats; a capped run ends before its schedule does.
    seconds: float = 900.0
    share_prefix: bool = True  # as learner.share_prefix, for the SFT batches
    demo_noise: float = 0.0  # imperfect demonstrator: this share of demonstrated steps is labelled with a random other admissible action


@dataclass
class RayConfig:
    address: str = ""  # empty: start a local Ray; "auto" or ray://... to join a cluster (KubeRay)
    num_cpus: int = 0  # local Ray only; 0: max(8, cores) logical CPUs so fractional actors fit
    dashboard: bool = True
    dashboard_host: str = "127.0.0.1"  # bind to localhost unless configured (issue 9)
    namespace: str = "proxmo"


@dataclass
class TrainConfig:
    """The root of the tree (``proxmo train --config FILE``)."""

    run_name: str = "quickstart"
    output_dir: str = "runs"
    mode: str = "sync"  # sync | async
    max_policy_lag: int = 1  # async: rollouts at most this many versions behind
    iterations: int = 25
    rl_seconds: float = 0.0  # > 0: start no new iteration after this many seconds of RL (at least one runs; those in flight finish)
    eval_every: int = 0
    eval_episodes: int = 400
    eval_split: str = "test"  # held-out tasks for `proxmo eval` and the before/after numbers
    eval_greedy: bool = False  # False: sample at sampling.temperature (the policy RL trains)
    # Evaluation episode i samples with seeds derived from (seed, i, turn): before/after evaluations share
    # their random numbers, and the improvement's standard error comes from the paired differences.
    eval_seeded: bool = True
    checkpoint_every: int = 5
    resume: bool = False
    seed: int = 0
    algorithm: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# --------------------------------------------------------------------------- loading


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only lossless cases."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, path)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} does not match {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = path or cls.__name__
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = _parse_scalar(raw)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Load YAML (or defaults when ``path`` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:  # binary files too (issue 9)
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        data = loaded
    apply_overrides(data, overrides or [])
    cfg = from_dict(TrainConfig, data)
    validate(cfg)
    return cfg


_ESTIMATORS_HINT = "grpo, gigpo, proxmo, proxmo_modulation_only, proxmo_soft_only"


def freeze_patterns(spec: str) -> list[str]:
    """``learner.freeze`` as a list: "embed_tokens, layers.0." -> ["embed_tokens", "layers.0."]."""
    return [part.strip() for part in spec.split(",")] if spec.strip() else []


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks; raise on the first problem with its dotted path."""
    errors: list[str] = []

    def check(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    a = cfg.algorithm
    check(0.0 < a.gamma <= 1.0, f"algorithm.gamma must be in (0, 1], got {a.gamma}")
    check(a.temperature > 0, f"algorithm.temperature must be > 0, got {a.temperature}")
    check(a.stats_over in ("rows", "trajectories"), f"algorithm.stats_over must be rows|trajectories, got {a.stats_over!r}")
    check(a.alpha > 0, f"algorithm.alpha must be > 0, got {a.alpha}")
    lo = cfg.loss
    check(lo.clip_ratio > 0, "loss.clip_ratio must be > 0")
    check(lo.dual_clip > 1.0, "loss.dual_clip must be > 1")
    check(lo.kl_coef >= 0 and lo.entropy_coef >= 0, "loss.kl_coef and loss.entropy_coef must be >= 0")
    check(lo.agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"), f"loss.agg unknown: {lo.agg!r}")
    check(bool(a.estimator), f"algorithm.estimator must name one of: {_ESTIMATORS_HINT}")
    check(cfg.mode in ("sync", "async"), f"mode must be sync|async, got {cfg.mode!r}")
    check(cfg.max_policy_lag >= 0, "max_policy_lag must be >= 0")
    check(cfg.iterations >= 0, "iterations must be >= 0")
    check(cfg.rl_seconds >= 0, "rl_seconds must be >= 0 (0: no time budget)")
    check(cfg.env.max_steps >= 1, "env.max_steps must be >= 1")
    check(cfg.env.history >= 0, "env.history must be >= 0")
    check(cfg.env.now_chars >= 0, f"env.now_chars must be >= 0 (0: the whole observation), got {cfg.env.now_chars}")
    check(cfg.env.action_projection in ("none", "nearest"),
          f"env.action_projection must be 'none' or 'nearest', got {cfg.env.action_projection!r}")
    check(0.0 <= cfg.env.projection_min_ratio <= 1.0, "env.projection_min_ratio must be in [0, 1]")
    check(cfg.env.reward in ("success", "score"),
          f"env.reward must be 'success' or 'score', got {cfg.env.reward!r}")
    check(cfg.env.action_format in ("text", "index"),
          f"env.action_format must be 'text' or 'index', got {cfg.env.action_format!r}")
    r = cfg.rollout
    check(r.group_size >= 1, "rollout.group_size must be >= 1")
    check(r.envs_per_worker >= 1, "rollout.envs_per_worker must be >= 1")
    check(0 <= r.min_workers <= r.num_workers <= r.max_workers,
          f"rollout: need 0 <= min_workers ({r.min_workers}) <= num_workers ({r.num_workers}) <= max_workers ({r.max_workers})")
    check(r.num_cpus > 0, "rollout.num_cpus must be > 0")
    s = cfg.serving
    check(1 <= s.min_replicas <= s.max_replicas,
          f"serving: need 1 <= min_replicas ({s.min_replicas}) <= max_replicas ({s.max_replicas})")
    check(0 < s.gpu_memory_utilization < 0.9 or s.num_gpus > 0,
          "serving.gpu_memory_utilization on CPU is the host-memory fraction vLLM reserves; keep it below 0.9")
    check(s.tensor_parallel_size >= 1, "serving.tensor_parallel_size must be >= 1")
    check(s.onednn_cache_capacity >= 0, "serving.onednn_cache_capacity must be >= 0 (0 disables oneDNN's cache)")
    check(s.tensor_parallel_size == 1 or s.num_gpus >= 1, "serving.tensor_parallel_size > 1 needs GPUs (serving.num_gpus)")
    b = cfg.buffer
    check(b.max_depth >= 1, "buffer.max_depth must be >= 1")
    check(b.max_staleness >= 0, "buffer.max_staleness must be >= 0")
    check(b.max_depth >= cfg.learner.groups_per_batch,
          f"buffer.max_depth ({b.max_depth}) must hold at least one batch (learner.groups_per_batch={cfg.learner.groups_per_batch})")
    check(b.url == "" or b.url.startswith(("redis://", "rediss://", "unix://")),
          f"buffer.url must start with redis://, rediss:// or unix://, got {b.url!r}")
    lr = cfg.learner
    check(lr.lr > 0, "learner.lr must be > 0")
    check(lr.groups_per_batch >= 1 and lr.micro_batch_size >= 1, "learner.groups_per_batch and micro_batch_size must be >= 1")
    check(lr.ppo_mini_batches >= 1, f"learner.ppo_mini_batches must be >= 1, got {lr.ppo_mini_batches}")
    check(lr.device in ("auto", "cpu", "cuda"), f"learner.device must be auto|cpu|cuda, got {lr.device!r}")
    check(isinstance(lr.freeze, str) and all(freeze_patterns(lr.freeze)),
          f"learner.freeze must be a comma-separated list of parameter-name parts, got {lr.freeze!r}")
    check(cfg.sampling.max_tokens >= 1, "sampling.max_tokens must be >= 1")
    check(cfg.model.max_model_len >= cfg.sampling.max_tokens + 16, "model.max_model_len too small for sampling.max_tokens")
    if cfg.mode == "async":
        check(b.max_staleness >= cfg.max_policy_lag,
              f"buffer.max_staleness ({b.max_staleness}) < max_policy_lag ({cfg.max_policy_lag}): async rollouts would all be dropped")
    _validate_limits(cfg, check)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def _validate_limits(cfg: TrainConfig, check) -> None:
    """Sizes and ranges that would otherwise fail late inside an actor, or be clamped silently (issue 9)."""
    import math

    b, lr, s, sv = cfg.buffer, cfg.learner, cfg.sampling, cfg.serving
    check(bool(cfg.run_name) and "/" not in cfg.run_name, f"run_name must be a non-empty name without '/', got {cfg.run_name!r}")
    check(cfg.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {cfg.checkpoint_every}")
    check(cfg.eval_episodes >= 0 and cfg.eval_every >= 0, "eval_episodes and eval_every must be >= 0")
    check(lr.ppo_epochs >= 1, f"learner.ppo_epochs must be >= 1, got {lr.ppo_epochs}")
    check(math.isfinite(lr.lr), f"learner.lr must be finite, got {lr.lr}")
    check(lr.grad_clip > 0 and lr.weight_decay >= 0 and lr.warmup_steps >= 0,
          "learner.grad_clip must be > 0, learner.weight_decay and learner.warmup_steps >= 0")
    check(lr.num_cpus >= 0 and lr.num_gpus >= 0, "learner.num_cpus and learner.num_gpus must be >= 0")
    check(s.temperature > 0 and s.eval_temperature >= 0,
          "sampling.temperature must be > 0 (the policy RL trains samples) and sampling.eval_temperature >= 0")
    # The PPO ratio's old log-probs must be those of the distribution that sampled: the engine's raw
    # log-probs are the temperature-1 model's, its processed ones the temperature-scaled (and top-p cut) one's.
    check(s.temperature == 1.0 or cfg.serving.logprobs_mode == "processed_logprobs" or cfg.learner.recompute_old_logprobs,
          f"sampling.temperature={s.temperature} needs serving.logprobs_mode=processed_logprobs "
          "(or learner.recompute_old_logprobs=true, sync mode only): raw log-probs are of the temperature-1 policy")
    check(s.top_p == 1.0 or not cfg.serving.logprobs_mode.startswith("processed"),
          "sampling.top_p < 1 with processed log-probs: the learner cannot reproduce the top-p cut; use top_p=1")
    check(0 < s.top_p <= 1, f"sampling.top_p must be in (0, 1], got {s.top_p}")
    check(cfg.env.step_timeout_s > 0, f"env.step_timeout_s must be > 0, got {cfg.env.step_timeout_s}")
    check(cfg.env.max_action_chars >= 1, "env.max_action_chars must be >= 1")
    m = cfg.model
    check(min(m.tiny_hidden, m.tiny_layers, m.tiny_heads, m.tiny_intermediate) >= 1
          and m.tiny_hidden % (2 * m.tiny_heads) == 0,
          f"model.tiny_hidden ({m.tiny_hidden}) must be a multiple of 2 x model.tiny_heads ({m.tiny_heads}) "
          "(an even head size for rotary embeddings), and tiny_layers and tiny_intermediate >= 1")
    check(cfg.model.dtype in ("float32", "float16", "bfloat16"),
          f"model.dtype must be float32|float16|bfloat16, got {cfg.model.dtype!r}")
    check(bool(b.stream) and bool(b.group), "buffer.stream and buffer.group must be non-empty")
    check(b.max_record_bytes >= 1024, f"buffer.max_record_bytes must be >= 1024, got {b.max_record_bytes}")
    check(b.push_timeout_s > 0 and b.reconnect_timeout_s >= 0 and b.dedupe_window_s > 0,
          "buffer.push_timeout_s and dedupe_window_s must be > 0, reconnect_timeout_s >= 0")
    check(b.appendfsync in ("always", "everysec", "no"), f"buffer.appendfsync must be always|everysec|no, got {b.appendfsync!r}")
    check(0 <= sv.port <= 65535, f"serving.port must be in 0..65535, got {sv.port}")
    check(sv.max_ongoing_requests >= 1 and sv.request_timeout_s > 0,
          "serving.max_ongoing_requests must be >= 1 and serving.request_timeout_s > 0")
    check(cfg.sft.batch_size >= 1 and cfg.sft.epochs > 0 and cfg.sft.seconds > 0,
          "sft.batch_size must be >= 1, sft.epochs and sft.seconds > 0")
    check(0.0 <= cfg.sft.demo_noise < 1.0, f"sft.demo_noise must be in [0, 1), got {cfg.sft.demo_noise}")
    check(cfg.ray.num_cpus >= 0, f"ray.num_cpus must be >= 0, got {cfg.ray.num_cpus}")
