"""The paper's agent protocol: what the model is shown each turn, and how its answer is read.

Prompt (one system + one user message; the caller renders them with the
model's chat template): the task, how many steps were already taken, the last
``k = cfg.history`` observation/action pairs (observations cut to
``cfg.obs_chars``), the current observation, the admissible actions, and the
instruction to reason inside ``<think></think>`` and answer inside
``<action></action>``. Wording differs per environment family; the ``twc``
family is deliberately terse because the CPU quick start trains a ~1M-parameter
model on ~150-token prompts (the tiny model's tokenizer makes each tag one token).

With ``env.action_format=index`` the admissible actions are numbered in the
prompt and the answer is a number (:func:`answer_for`, :func:`resolve_choice`);
the environment plays the action it names (``TextEnv.step``).

Parser (paper): lowercase, take the first ``<action>...</action>``; the turn is
*invalid* when the tag is missing, the text contains CJK characters, or the
action is empty or longer than ``max_chars``. Invalid turns get ``action=""``;
the rollout worker spends the turn without stepping the environment (the
observation stays the same) and the learner applies the invalid-action penalty.
Every adapter also answers an empty or junk command without failing, for
callers that do step the environment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.config import EnvConfig

# Two plain searches instead of one lazy pattern: "<action>(.*?)</action>" re-scans the rest of
# the text for every unclosed opening tag (quadratic on adversarial outputs); this is linear.
_OPEN_RE = re.compile(r"<action>", re.IGNORECASE)
_CLOSE_RE = re.compile(r"</action>", re.IGNORECASE)
# CJK Unified Ideographs (+ext A), compatibility ideographs, kana, hangul, CJK punctuation.
_CJK_RE = re.compile(r"[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")


@dataclass(frozen=True)
class ParsedAction:
    action: str  # lowercased action, "" when invalid
    valid: bool
    reason: str  # "" when valid; else missing_tag | cjk | empty | too_long


def parse_action(text: str, max_chars: int) -> ParsedAction:
    """Read the model's answer per the paper's rules."""
    if not isinstance(text, str):
        return ParsedAction("", False, "missing_tag")
    if _CJK_RE.search(text):
        return ParsedAction("", False, "cjk")
    opened = _OPEN_RE.search(text)
    closed = _CLOSE_RE.search(text, opened.end()) if opened else None
    if closed is None:
        return ParsedAction("", False, "missing_tag")
    action = " ".join(text[opened.end() : closed.start()].split()).lower()
    if not action:
        return ParsedAction("", False, "empty")
    if len(action) > max_chars:
        return ParsedAction("", False, "too_long")
    return ParsedAction(action, True, "")


def format_response(action: str, think: str = "") -> str:
    """The target string for supervised warm-start (and what a perfect model emits)."""
    return f"<think>{think}</think><action>{action}</action>"


def answer_for(action: str, admissible_actions: list[str], cfg: EnvConfig) -> str:
    """What the model should write inside ``<action>`` to play ``action``.

    With ``cfg.action_format == "index"`` that is the action's 1-based number in
    the list the prompt shows, or the text itself when it is not listed (an
    expert action the env does not list; :func:`resolve_choice` reads text too).
    """
    if cfg.action_format == "index":
        lowered = [a.lower() for a in admissible_actions]
        if action.lower() in lowered:
            return str(lowered.index(action.lower()) + 1)
    return action


def resolve_choice(answer: str, admissible_actions: list[str]) -> str | None:
    """The admissible action a numbered answer picks ("2" -> the second), else None."""
    text = answer.strip()
    if text.isdigit() and text.isascii():
        k = int(text)
        if 1 <= k <= len(admissible_actions):
            return admissible_actions[k - 1]
    return None


def _action_list(admissible: list[str], cfg: EnvConfig, sep: str, quote: bool) -> str:
    if cfg.action_format == "index":
        return sep.join(f"{i} {a}" for i, a in enumerate(admissible, 1))
    return sep.join(f"'{a}'" if quote else a for a in admissible)


# --------------------------------------------------------------------------- templates

_SYSTEM = {
    "generic": ("You are an agent in a text environment. Each turn, reason inside <think></think> "
                "and then give exactly one admissible action inside <action></action>."),
    "twc": "Play the text game. Reply <think>...</think><action>...</action>.",
}

# Per family: how the environment is introduced in the user message.
_INTRO = {
    "generic": "You are acting in a text-based environment.",
    "alfworld": "You are an agent in a household (ALFRED) text environment.",
    "scienceworld": "You are an agent doing a science experiment in a text world (ScienceWorld).",
    "webshop": "You are an agent shopping on a web store (WebShop) to satisfy an instruction.",
    "textworld": "You are playing a text adventure game (TextWorld).",
    "textworldexpress": "You are playing a text game (TextWorldExpress).",
}


def _cut(text: str, n: int) -> str:
    """Whitespace collapsed, then at most ``n`` characters (``n`` <= 0: all of them)."""
    text = " ".join(text.split())
    return text if n <= 0 or len(text) <= n else text[:n]


def _family(cfg: EnvConfig) -> str:
    fam = str(cfg.options.get("template", "")) if cfg.options else ""
    if fam:
        return fam
    if cfg.name == "textworldexpress" and cfg.game == "twc":
        return "twc"
    return cfg.name if cfg.name in _INTRO else "generic"


def build_messages(task_description: str, history: list[tuple[str, str]], observation: str,
                   admissible_actions: list[str], step: int, cfg: EnvConfig) -> list[dict]:
    """Chat messages for one turn.

    ``history`` holds (observation, action) pairs of earlier turns, oldest first;
    only the last ``cfg.history`` are shown. ``step`` is the number of steps
    already taken (0 on the first turn).
    """
    fam = _family(cfg)
    recent = history[-cfg.history:] if cfg.history > 0 else []
    if fam == "twc":
        return [{"role": "system", "content": _SYSTEM["twc"]},
                {"role": "user", "content": _twc_user(task_description, recent, observation,
                                                     admissible_actions, step, cfg)}]
    intro = _INTRO.get(fam, _INTRO["generic"])
    parts = [intro, f"Your task: {task_description.strip()}"]
    if step == 0 or not recent:
        parts.append(f"This is step {step + 1}; you have taken {step} step(s) so far.")
    else:
        parts.append(f"You have taken {step} step(s) so far. Your last {len(recent)} "
                     "observation(s) and the action you took after each:")
        start = step - len(recent) + 1
        for i, (obs, act) in enumerate(recent):
            parts.append(f"[step {start + i}] observation: {_cut(obs, cfg.obs_chars)}\naction: {act}")
    parts.append(f"Now, at step {step + 1}, you observe: "
                 + (_cut(observation, cfg.now_chars) if cfg.now_chars > 0 else observation.strip()))
    if cfg.action_format == "index":
        parts.append("Admissible actions, numbered: " + _action_list(admissible_actions, cfg, "; ", False))
        parts.append("Think step by step inside <think> </think>, then write the number of one "
                     "admissible action inside <action> </action>.")
    else:
        parts.append("Admissible actions: [" + _action_list(admissible_actions, cfg, ", ", True) + "]")
        parts.append("Think step by step inside <think> </think>, then write one admissible action "
                     "inside <action> </action>.")
    return [{"role": "system", "content": _SYSTEM["generic"]},
            {"role": "user", "content": "\n".join(parts)}]


def _twc_user(task: str, recent: list[tuple[str, str]], observation: str,
              admissible: list[str], step: int, cfg: EnvConfig) -> str:
    lines = [f"Task: {task.strip()}", f"Step {step + 1}."]
    for obs, act in recent:
        lines.append(f"Saw: {_cut(obs, cfg.obs_chars)}\nDid: {act}")
    lines.append(f"Now: {_cut(observation, cfg.now_chars)}")
    lines.append("Actions: " + _action_list(admissible, cfg, " | ", False))
    return "\n".join(lines)
