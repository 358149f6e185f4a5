"""Supervised warm start on expert demonstrations (`proxmo sft`).

A randomly initialised model never emits the ``<action>`` format, so RL from
scratch gets no reward. The CPU quick start therefore builds the tiny model
(tokenizer trained on environment text), then fine-tunes it on won expert
episodes rendered in the agent protocol, for a fixed time budget with a cosine
schedule. With a real model (``model.tiny=false``) SFT fine-tunes the folder
the user gives.

Loss is on the response tokens only (the assistant turn as the chat template
renders it, including its end-of-turn token), so the model learns to stop.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from services.config import ConfigError, EnvConfig, ModelConfig, SFTConfig, TrainConfig, load_config
from services.serving.tiny_model import TOKENIZER_VERSION

log = logging.getLogger(__name__)


def encode_example(tokenizer, messages: list[dict], response: str) -> tuple[list[int], list[int]]:
    """Prompt ids exactly as the rollout worker renders them, and the assistant-turn ids."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("chat template renders the assistant turn without the generation prompt as prefix")
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return enc(prompt), enc(full[len(prompt):].rstrip("\n"))


def _batches(data: list[tuple[list[int], list[int]]], batch_size: int, rng: random.Random):
    order = list(range(len(data)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [data[j] for j in order[i : i + batch_size]]


def _collate(batch, pad_id: int):
    length = max(len(p) + len(r) for p, r in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    attn = torch.zeros((len(batch), length), dtype=torch.long)
    for i, (p, r) in enumerate(batch):
        seq = p + r
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p) : len(seq)] = torch.tensor(r)
        attn[i, : len(seq)] = 1
    return ids, attn, labels


def response_nll(model, ids, attn, labels, share_prefix: bool = True) -> torch.Tensor:
    """Mean negative log-likelihood of the labelled tokens (transformers' causal-LM loss for these
    labels), through the learner's path: the head on response positions only, and the prompt
    prefix the batch shares computed once."""
    from services.learner import token_logprobs

    mask = labels[:, 1:] != -100
    logp, _ = token_logprobs(model, ids, attn, mask=mask, share_prefix=share_prefix)
    return -logp.sum() / mask.sum()


def sft_train(model_dir: str | Path, examples: list[dict], cfg: SFTConfig, *, seed: int = 0,
              max_len: int = 512, out_dir: str | Path | None = None) -> dict[str, float]:
    """Fine-tune ``model_dir`` on ``examples`` for ``cfg.seconds`` or ``cfg.epochs``; save to ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not examples:
        raise ValueError("SFT needs at least one expert example (did every expert episode fail?)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    data = [encode_example(tokenizer, ex["messages"], ex["response"]) for ex in examples]
    too_long = sum(len(p) + len(r) > max_len for p, r in data)
    data = [(p, r) for p, r in data if len(p) + len(r) <= max_len]
    if too_long:
        log.warning("SFT: %d examples longer than %d tokens left out", too_long, max_len)
    bs = min(cfg.batch_size, len(data))
    total_steps = max(1, int(cfg.epochs * len(data) / bs))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    t0, step, ema = time.perf_counter(), 0, None
    for batch in _batches(data, bs, rng):
        # The schedule follows the step count only, so a run is repeatable: a schedule that also
        # followed the clock gave each run a slightly different learning rate, and warm starts of
        # the same recipe differed in held-out success by a factor of three (BENCHMARKS.md, session 11).
        progress = step / total_steps
        if progress >= 1.0 or time.perf_counter() - t0 >= cfg.seconds:
            break
        for group in opt.param_groups:  # cosine to 10% of the base rate
            group["lr"] = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        ids, attn, labels = _collate(batch, pad)
        loss = response_nll(model, ids, attn, labels, cfg.share_prefix)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        val = loss.item()
        ema = val if ema is None else 0.95 * ema + 0.05 * val
        if step % 50 == 0:
            log.info("sft step %d loss %.4f (%.0f s)", step, ema, time.perf_counter() - t0)
    if step < total_steps:
        log.warning("SFT stopped by its time cap (sft.seconds=%s) after %d of %d steps", cfg.seconds, step, total_steps)
    out = Path(out_dir or model_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for extra in ("generation_config.json",):
        src = Path(model_dir, extra)
        if src.is_file() and Path(out).resolve() != Path(model_dir).resolve():
            shutil.copy(src, Path(out, extra))
    return {"sft_steps": step, "sft_planned_steps": total_steps, "sft_loss": ema or float("nan"), "sft_seconds": time.perf_counter() - t0,
            "sft_examples": len(data)}


def corpus_from_examples(examples: list[dict]) -> list[str]:
    """Environment text for the tokenizer: every prompt message and every response."""
    lines = []
    for ex in examples:
        lines.extend(m["content"] for m in ex["messages"])
        lines.append(ex["response"])
    return lines


PROMPT_FIELDS = ("name", "game", "game_params", "history", "obs_chars", "now_chars", "action_format")


def prompt_fingerprint(env: EnvConfig) -> dict[str, Any]:
    """The env settings that decide what the policy is shown and how it must answer."""
    return {**{k: getattr(env, k) for k in PROMPT_FIELDS}, "template": str(env.options.get("template", ""))}


def _stale_warm_start(path: Path, env: EnvConfig, demo_noise: float | None = None) -> list[str]:
    """Settings that differ between the tiny model at ``path`` and ``env`` / ``demo_noise`` (``[]``: none or unknown)."""
    try:
        record = json.loads((path / "sft_stats.json").read_text())
    except (OSError, ValueError):
        return []  # not built here, or built before the settings were recorded: trust the user's folder
    built = record.get("env") if isinstance(record, dict) else None
    if not isinstance(built, dict):
        return []
    now = prompt_fingerprint(env)
    defaults = prompt_fingerprint(EnvConfig())
    old = {k: built.get(k, defaults[k]) for k in now}  # a field added since the build: its default then
    stale = [f"{k}: {old[k]!r} -> {now[k]!r}" for k in now if old[k] != now[k]]
    built_tok = int(record.get("tokenizer_version", 1))  # older records: before the protocol's tags were tokens
    if built_tok != TOKENIZER_VERSION:
        stale.append(f"tokenizer version: {built_tok} -> {TOKENIZER_VERSION}")
    built_noise = float(record.get("demo_noise", 0.0))  # older records: a clean expert
    if demo_noise is not None and built_noise != demo_noise:
        stale.append(f"sft.demo_noise: {built_noise} -> {demo_noise}")
    return stale


def ensure_warm_model(model: ModelConfig, env: EnvConfig, sft: SFTConfig, seed: int = 0) -> str:
    """Return a model folder to start RL from, building + warm-starting the tiny model if needed.

    A tiny model built here for other prompt settings (say ``env.action_format=text`` when the
    config now says ``index``) would answer in the wrong format, so it is rebuilt, with a warning.
    """
    from services.envs.experts import expert_examples

    path = Path(model.path)
    if (path / "config.json").is_file():
        stale = _stale_warm_start(path, env, sft.demo_noise) if model.tiny else []
        if not stale:
            return str(path)
        log.warning("model.path %s was warm-started with other settings (%s); rebuilding it",
                    path, "; ".join(stale))
    if not model.tiny:
        raise ConfigError(
            f"model.path {str(path)!r} is not a Hugging Face model folder (no config.json). Download the model "
            "yourself (e.g. Qwen2.5-1.5B-Instruct) and point model.path at it, or set model.tiny=true to build "
            "the tiny CPU model here.")
    from services.serving.tiny_model import build_tiny_model

    t0 = time.perf_counter()
    examples = expert_examples(env, sft.episodes, seed=seed + 1_000_003, split="train", noise=sft.demo_noise)
    log.info("warm start: %d expert examples in %.1f s", len(examples), time.perf_counter() - t0)
    base = path.with_name(path.name + ".init")
    if base.exists():
        shutil.rmtree(base)
    build_tiny_model(base, corpus_from_examples(examples), max_position=model.max_model_len, seed=seed,
                     hidden=model.tiny_hidden, layers=model.tiny_layers, heads=model.tiny_heads,
                     intermediate=model.tiny_intermediate)
    tmp = path.with_name(path.name + ".tmp")
    stats = sft_train(base, examples, sft, seed=seed, max_len=model.max_model_len, out_dir=tmp)
    (tmp / "sft_stats.json").write_text(json.dumps({**stats, "demo_noise": sft.demo_noise, "env": prompt_fingerprint(env),
                                                   "tokenizer_version": TOKENIZER_VERSION},
                                                  indent=2))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    shutil.rmtree(base, ignore_errors=True)
    log.info("warm start done: %s", stats)
    return str(path)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="proxmo sft", description="Warm-start the policy on expert demonstrations.")
    p.add_argument("--config", default=None, help="YAML config (the train config; uses model/env/sft)")
    p.add_argument("--force", action="store_true", help="rebuild even if model.path exists")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.seconds=60")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg: TrainConfig = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.force and Path(cfg.model.path).exists():
        shutil.rmtree(cfg.model.path)
    path = ensure_warm_model(cfg.model, cfg.env, cfg.sft, cfg.seed)
    print(f"model={path}")
    return 0
