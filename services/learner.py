"""The learner: episode groups in, one PPO-style policy update out.

A plain class (the driver wraps it with ``ray.remote``), so a test can run it
in-process. All advantage math is a call into :mod:`proxmo`; this module only
moves data: it flattens :class:`~services.contracts.GroupRecord` s into rows,
pads token sequences into micro-batches, computes token log-probs with the
training model (and the frozen reference model for the KL term), and steps the
optimizer.

Departures from the paper setting, all configurable:
- the importance ratio uses the *sampling* log-probs returned by the inference
  engine as the old policy (they match a transformers forward pass to ~1e-6 on
  the CPU build; see tests/integration/test_serving*). With
  ``learner.recompute_old_logprobs`` they are recomputed by the learner instead.
- rows of episodes flagged ``infra_failure`` are masked out of the advantage
  statistics (proxmo ``mask``) and of the loss, instead of scoring 0.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

import services.featurizers  # noqa: F401  (registers the "minilm" featurizer; the model loads on first use)
from proxmo import AdvantageInputs, compute_advantages
from proxmo.config import AdvantageConfig, LossConfig
from proxmo.losses import policy_loss
from services.config import LearnerConfig, freeze_patterns
from services.contracts import GroupRecord

log = logging.getLogger(__name__)

CHECKPOINT_STATE = "trainer_state.pt"
CHECKPOINT_META = "trainer_meta.json"


class RowTokens(NamedTuple):
    """The token arrays of one row: views of its group's :class:`~services.contracts.StepColumns`."""

    prompt_ids: np.ndarray
    response_ids: np.ndarray
    logprobs: np.ndarray


@dataclass
class Rows:
    """A batch flattened to (trajectory, step) rows, aligned with proxmo inputs."""

    inputs: AdvantageInputs
    steps: list[RowTokens]  # per row, what the update needs of the step (same attribute names as StepRecord)
    trainable: np.ndarray  # bool [N]: has response tokens and is not an infra failure


def flatten_groups(groups: list[GroupRecord]) -> Rows:
    """Groups -> rows; every step of every episode is one row (DESIGN.md).

    Reads each group's columns (``GroupRecord.step_columns``), so the StepRecords of a group
    decoded from the buffer are never built (issue 3).
    """
    group, traj, step, reward, valid, anchor, success, mask, rows = ([] for _ in range(9))
    for g in groups:
        c = g.step_columns()
        po, qo = c.p_off.tolist(), c.q_off.tolist()
        rows += [RowTokens(c.p[a:b], c.q[x:y], c.lp[x:y]) for a, b, x, y in zip(po, po[1:], qo, qo[1:])]
        reward += c.reward.tolist()
        valid += (c.valid != 0).tolist()
        anchor += c.obs
        for ei, (ep, n) in enumerate(zip(g.episodes, c.ep_steps.tolist(), strict=True)):
            group += [g.group_id] * n
            traj += [f"{g.group_id}/{ei}"] * n
            step += range(n)
            success += [bool(ep.won)] * n
            mask += [not ep.infra_failure] * n
    inputs = AdvantageInputs(group=group, traj=traj, step=step, reward=reward, valid=valid,
                             anchor=anchor, success=success, mask=mask)
    trainable = np.array([m and len(r.response_ids) > 0 for m, r in zip(mask, rows)], dtype=bool)
    return Rows(inputs=inputs, steps=rows, trainable=trainable)


def freeze_parameters(model, patterns: list[str]) -> list[str]:
    """Stop training every parameter whose name contains one of ``patterns``; returns their names.

    Measured on the quick start (BENCHMARKS.md, session 9): most of an RL gradient's norm sits in
    the token embeddings, where every prompt token of every row adds to it; a change there moves
    every state at once.
    """
    named = list(model.named_parameters())
    unmatched = [pat for pat in patterns if not any(pat in n for n, _ in named)]
    if unmatched:
        raise ValueError(f"learner.freeze: {', '.join(map(repr, unmatched))} match no parameter of the model "
                         f"(names look like {named[0][0]!r})")
    chosen = [(n, p) for n, p in named if any(pat in n for pat in patterns)]
    if len(chosen) == len(named):
        raise ValueError("learner.freeze leaves no parameter to train")
    for _, p in chosen:
        p.requires_grad_(False)
    return [n for n, _ in chosen]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("learner.device=cuda but no CUDA device is visible")
    return torch.device(name)


def _pad_batch(steps: list[RowTokens], device: torch.device):
    """Right-padded prompt+response ids and the positions of response tokens.

    ``steps``: anything with ``prompt_ids`` and ``response_ids`` (RowTokens, StepRecord).

    Returns ids [B, L], attention [B, L], and for the shifted logits
    (position t predicts token t+1) a response mask [B, L-1].
    """
    seqs = [np.concatenate([s.prompt_ids, s.response_ids]) for s in steps]
    length = max(len(x) for x in seqs)
    ids = torch.zeros((len(seqs), length), dtype=torch.long)
    attn = torch.zeros((len(seqs), length), dtype=torch.long)
    resp = torch.zeros((len(seqs), length - 1), dtype=torch.bool)
    for i, (s, x) in enumerate(zip(steps, seqs)):
        ids[i, : len(x)] = torch.from_numpy(x.astype(np.int64))
        attn[i, : len(x)] = 1
        p, r = len(s.prompt_ids), len(s.response_ids)
        resp[i, p - 1 : p - 1 + r] = True
    return ids.to(device), attn.to(device), resp.to(device)


def _decoder_and_head(model):
    """(decoder, output head) when logits are exactly ``head(decoder(...).last_hidden_state)``."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None, None  # Gemma-2 / Cohere style post-processing of the logits
    try:
        return model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, ValueError, NotImplementedError):
        return None, None


MIN_SHARED_PREFIX = 8  # tokens: below this the second forward call costs more than the prefix saves


def shared_prefix_len(ids: torch.Tensor, mask: torch.Tensor, attn: torch.Tensor | None = None) -> int:
    """Leading positions where every row of ``ids`` [B, L] holds the same token, ending before the
    first response position of any row (``mask`` [B, L-1], as :func:`token_logprobs` takes it), so
    the hidden state that predicts each response token is outside the prefix. 0 for a single row.
    With ``attn`` [B, L], a position some row masks out (left padding) also ends the prefix: the
    prefix runs without an attention mask."""
    if ids.shape[0] < 2 or ids.shape[1] < 2:
        return 0
    same = (ids == ids[:1]).all(dim=0)
    if attn is not None:
        same &= attn.bool().all(dim=0)
    same = same.long()
    common = int(same.cumprod(dim=0).sum())
    first_response = int(mask.long().argmax(dim=1).min())  # a row without a response gives 0: no sharing
    return min(common, first_response)


def _decoder_hidden(model, decoder, ids, attn, mask, share_prefix: bool) -> tuple[torch.Tensor, int]:
    """The decoder's last hidden states from position ``P`` on, and ``P``.

    With ``share_prefix``, the prompt prefix every row shares (the system prompt and, on twc,
    the task: a third of a quick-start batch's tokens) runs once, as a batch of one; its keys
    and values are repeated across the rows and the rest runs on top of them. The prefix's
    activations get the sum of the rows' gradients, so values and gradients are the full
    forward's up to float rounding (tests/unit/services/test_learner.py).
    """
    p = shared_prefix_len(ids, mask, attn) if share_prefix else 0
    if p < MIN_SHARED_PREFIX or getattr(model, "is_gradient_checkpointing", False):
        # (with gradient checkpointing transformers drops past_key_values: the plain path is the exact one)
        return decoder(input_ids=ids, attention_mask=attn).last_hidden_state, 0
    cache = decoder(input_ids=ids[:1, :p], use_cache=True).past_key_values
    cache.batch_repeat_interleave(ids.shape[0])
    out = decoder(input_ids=ids[:, p:], attention_mask=attn, past_key_values=cache, use_cache=False)
    return out.last_hidden_state, p


def token_logprobs(model, ids, attn, with_entropy: bool = False, mask=None, temperature: float = 1.0,
                   share_prefix: bool = False):
    """Log-prob of each next token [B, L-1] under softmax(logits / temperature) (and its entropy).

    ``temperature`` is the sampling temperature of the rollouts: the policy that sampled
    the tokens, and the one the update trains, is the temperature-scaled model.

    With ``mask`` [B, L-1] (the response positions), the output head and the
    softmax run on those positions only and every other position is 0: prompts
    are ~90% of the tokens of an agent turn, and for a 150k-token vocabulary the
    full-sequence logits would dwarf the model's activations. Models without a
    separable decoder/head fall back to full logits. With ``share_prefix`` (mask
    path only) the prompt prefix common to all rows runs once (:func:`_decoder_hidden`).
    """
    decoder, head = _decoder_and_head(model) if mask is not None else (None, None)
    if decoder is None:
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        logp = torch.log_softmax(logits / temperature, dim=-1)
        chosen = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1) if with_entropy else None
        if mask is not None:
            chosen = chosen * mask
            entropy = entropy * mask if entropy is not None else None
        return chosen, entropy
    hidden, p = _decoder_hidden(model, decoder, ids, attn, mask, share_prefix)
    where = mask.nonzero(as_tuple=True)  # no response position lies before p
    hidden = hidden[:, :-1][where[0], where[1] - p]
    logp = torch.log_softmax(head(hidden).float() / temperature, dim=-1)  # [N, V], N = response tokens
    picked = logp.gather(-1, ids[:, 1:][where].unsqueeze(-1)).squeeze(-1)
    chosen = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).index_put(where, picked)
    entropy = None
    if with_entropy:
        ent = -(logp.exp() * logp).sum(-1)
        entropy = torch.zeros(mask.shape, dtype=ent.dtype, device=ent.device).index_put(where, ent)
    return chosen, entropy


def _scatter_response(values: list[np.ndarray], resp: torch.Tensor) -> torch.Tensor:
    """Place per-row response arrays at the response positions of a [B, L-1] tensor."""
    out = torch.zeros(resp.shape, dtype=torch.float32, device=resp.device)
    for i, v in enumerate(values):
        idx = resp[i].nonzero(as_tuple=True)[0]
        out[i, idx] = torch.as_tensor(np.asarray(v, dtype=np.float32), device=resp.device)
    return out


class Learner:
    """Owns the policy being trained, its optimizer, and the frozen reference policy."""

    def __init__(self, model_path: str, cfg: LearnerConfig, algorithm: AdvantageConfig, loss: LossConfig,
                 *, dtype: str = "float32", temperature: float = 1.0):
        from transformers import AutoModelForCausalLM

        if not Path(model_path, "config.json").is_file():
            raise FileNotFoundError(f"model path {model_path!r} is not a Hugging Face model folder (no config.json)")
        if not temperature > 0:
            raise ValueError(f"the sampling temperature the learner trains must be > 0, got {temperature}")
        self.cfg, self.algorithm, self.loss_cfg = cfg, algorithm, loss
        self.temperature = float(temperature)  # sampling.temperature: the policy is softmax(logits / T)
        self.model_path = str(model_path)
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        tdtype = getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=tdtype).to(self.device)
        self.model.train()
        self.frozen = freeze_parameters(self.model, freeze_patterns(cfg.freeze))
        self.ref_model = None
        if loss.kl_coef > 0:
            self.ref_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=tdtype).to(self.device)
            self.ref_model.eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr,
                                           betas=tuple(cfg.betas),
                                           weight_decay=cfg.weight_decay)
        warm = max(cfg.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warm) if warm else 1.0)
        self.step = 0  # optimizer updates committed
        self.version = 0  # policy version served by the endpoint after the last publish

    # ------------------------------------------------------------------ stages

    def advantages(self, groups: list[GroupRecord]) -> tuple[Rows, Any]:
        rows = flatten_groups(groups)
        if not rows.steps:
            raise ValueError("no rows to train on: every group is empty")
        return rows, compute_advantages(rows.inputs, self.algorithm)

    def update(self, groups: list[GroupRecord]) -> dict[str, float]:
        """``ppo_epochs`` x ``ppo_mini_batches`` optimizer steps on ``groups``. Returns metrics.

        Each epoch splits the trainable rows at random (seeded by the step count, so a
        resumed run splits the same way) into ``ppo_mini_batches`` mini-batches, one
        optimizer step each, as PPO does; after the first step the policy is off the
        sampler's, which the clipped ratio accounts for.
        """
        t0 = time.perf_counter()
        rows, adv = self.advantages(groups)
        t_adv = time.perf_counter() - t0
        trainable = np.flatnonzero(rows.trainable)
        metrics: dict[str, float] = {"rows": float(len(rows.steps)), "trainable_rows": float(len(trainable))}
        if len(trainable) == 0:
            log.warning("batch has no trainable rows (all infra failures or empty responses); skipping update")
            return metrics | {"skipped": 1.0}
        resp_len = np.array([len(s.response_ids) for s in rows.steps])
        length = resp_len + np.array([len(s.prompt_ids) for s in rows.steps])
        if self.cfg.recompute_old_logprobs:
            self._recompute_old_logprobs(rows, trainable, length)
        n_mini = max(1, min(self.cfg.ppo_mini_batches, len(trainable)))
        for _ in range(self.cfg.ppo_epochs):
            order = np.random.default_rng([self.cfg.seed, self.step]).permutation(trainable) if n_mini > 1 else trainable
            for part in np.array_split(order, n_mini):
                # The token-mean loss does not depend on the micro-batch split.
                total_tokens = float(resp_len[part].sum())
                self.optimizer.zero_grad(set_to_none=True)
                agg = {}
                for reps, members in self._forward_batches(part, length, rows.steps):
                    out, n_tok = self._micro_step(rows.steps, reps, members, adv.advantages, len(part), total_tokens)
                    for k, v in out.items():
                        agg[k] = agg.get(k, 0.0) + v * n_tok / total_tokens
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
                if not torch.isfinite(grad_norm):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise FloatingPointError(f"non-finite gradient norm {grad_norm} at step {self.step}; update refused")
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
        total_tokens = float(resp_len[trainable].sum())
        metrics.update({f"loss/{k}": v for k, v in agg.items()})
        metrics.update(_advantage_stats(adv, rows))
        metrics.update({"grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0],
                        "time/advantage_s": t_adv, "time/update_s": time.perf_counter() - t0 - t_adv,
                        "response_tokens": total_tokens})
        return metrics

    def _forward_batches(self, idx: np.ndarray, length: np.ndarray, steps: list[RowTokens], merge: bool = True):
        """``idx`` sorted by sequence length (similar lengths pad less), as micro-batches of
        ``micro_batch_size`` forward rows. With ``merge``, rows with the same prompt and response (the
        same turn in several episodes of a group: ~11% of a quick-start batch) share one forward row.
        Returns (forward rows, for each the rows it stands for) per micro-batch."""
        members: dict[int, list[int]] = {}
        first: dict[tuple[bytes, bytes], int] = {}
        for i in idx[np.argsort(length[idx], kind="stable")].tolist():
            key = (steps[i].prompt_ids.tobytes(), steps[i].response_ids.tobytes()) if merge else (i, b"")
            members.setdefault(first.setdefault(key, i), []).append(i)
        reps, n = list(members), self.cfg.micro_batch_size
        return [(np.array(reps[i : i + n]), [members[r] for r in reps[i : i + n]]) for i in range(0, len(reps), n)]

    @torch.no_grad()
    def _recompute_old_logprobs(self, rows: Rows, trainable: np.ndarray, length: np.ndarray) -> None:
        """Replace the sampler's log-probs by this model's, once, before the first optimizer step.

        Every mini-batch and epoch of the update then takes its ratio against the same
        pre-update policy (recomputing them inside each micro-step would make every ratio 1
        and switch the clipping off).
        """
        for reps, members in self._forward_batches(trainable, length, rows.steps):
            ids, attn, resp = _pad_batch([rows.steps[i] for i in reps], self.device)
            logp, _ = token_logprobs(self.model, ids, attn, mask=resp, temperature=self.temperature,
                                     share_prefix=self.cfg.share_prefix)
            for j, same in enumerate(members):
                lp = logp[j][resp[j]].float().cpu().numpy()
                for i in same:
                    rows.steps[i] = rows.steps[i]._replace(logprobs=lp)

    def _micro_step(self, steps: list[RowTokens], reps: np.ndarray, members: list[list[int]], adv: np.ndarray,
                    n_rows: int, total_tokens: float):
        """Forward the rows ``reps``; the loss counts each once for every row in its ``members``
        (each with its own advantage and sampling log-probs), so the gradient is the one of all rows."""
        ids, attn, resp = _pad_batch([steps[i] for i in reps], self.device)
        logp, entropy = token_logprobs(self.model, ids, attn, with_entropy=self.loss_cfg.entropy_coef > 0, mask=resp,
                                       temperature=self.temperature, share_prefix=self.cfg.share_prefix)
        ref = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref, _ = token_logprobs(self.ref_model, ids, attn, mask=resp, temperature=self.temperature,
                                        share_prefix=self.cfg.share_prefix)
        rows = [i for m in members for i in m]
        if len(rows) > len(reps):
            expand = torch.as_tensor([j for j, m in enumerate(members) for _ in m], device=self.device)
            logp, resp = logp[expand], resp[expand]
            entropy = entropy[expand] if entropy is not None else None
            ref = ref[expand] if ref is not None else None
        old = _scatter_response([steps[i].logprobs for i in rows], resp)
        adv_t = torch.as_tensor(adv[rows], dtype=torch.float32, device=self.device)
        out = policy_loss(logp, old, adv_t, resp.float(), ref_logprobs=ref, entropy=entropy, cfg=self.loss_cfg)
        n_tok = float(resp.sum())
        # Token-mean over the whole batch: weight each micro-batch by its share of tokens
        # (rows for sequence-mean aggregation), so the gradient does not depend on the split.
        share = n_tok / total_tokens if self.loss_cfg.agg == "token-mean" else len(rows) / n_rows
        (out.loss * share).backward()
        return {"total": float(out.loss.detach()), **out.metrics}, n_tok

    # ------------------------------------------------------------------ weights & checkpoints

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu") for k, v in self.model.state_dict().items()}

    def save_checkpoint(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """HF model folder + optimizer/scheduler/RNG state; written to a temp dir then renamed."""
        final = Path(path)
        tmp = final.with_name(final.name + ".tmp")
        if tmp.exists():
            _rmtree(tmp)
        tmp.mkdir(parents=True)
        self.model.save_pretrained(tmp, safe_serialization=True)
        _copy_tokenizer_files(self.model_path, tmp)  # a checkpoint loads by itself in transformers and vLLM
        torch.save({
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }, tmp / CHECKPOINT_STATE)
        (tmp / CHECKPOINT_META).write_text(json.dumps({"step": self.step, "version": self.version, **(extra or {})}))
        if final.exists():
            _rmtree(final)
        tmp.rename(final)
        return final

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM

        path = Path(path)
        meta = json.loads((path / CHECKPOINT_META).read_text())
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=next(self.model.parameters()).dtype)
        self.model.load_state_dict(loaded.state_dict())
        # Local trusted file written by save_checkpoint (never crosses the network).
        state = torch.load(path / CHECKPOINT_STATE, map_location=self.device, weights_only=False)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as exc:  # another set of trained parameters than the checkpoint's
            raise ValueError(f"{path}: the optimizer state does not fit the parameters this learner trains "
                             f"(was learner.freeze changed since the checkpoint? now {self.cfg.freeze!r}): {exc}") from exc
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.step, self.version = int(meta["step"]), int(meta["version"])
        return meta


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")


def _copy_tokenizer_files(src: str | os.PathLike, dst: Path) -> None:
    """The tokenizer (and generation config) of the source model folder, where the checkpoint lacks them."""
    for name in TOKENIZER_FILES:
        f = Path(src, name)
        if f.is_file() and not (dst / name).exists():
            shutil.copy2(f, dst / name)


def _advantage_stats(adv, rows: Rows) -> dict[str, float]:
    a = np.asarray(adv.advantages, dtype=np.float64)[rows.trainable]
    out = {"adv/mean": float(a.mean()), "adv/std": float(a.std()), "adv/max": float(a.max()), "adv/min": float(a.min())}
    for key in ("modulation_weight", "success_rate", "episode_adv", "step_adv"):
        if key in adv.extras:
            v = np.asarray(adv.extras[key], dtype=np.float64)[rows.trainable]
            if v.size and np.all(np.isfinite(v)):
                out[f"adv/{key}_mean"] = float(v.mean())
    out["adv/nonzero_frac"] = float(np.mean(np.abs(a) > 1e-8))
    return out


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=False)

