"""A tiny Llama-architecture policy model built locally (no hub, no download).

Why: the CPU default needs a model that both transformers (learner) and vLLM
(serving) load from one Hugging Face folder. We train a byte-level BPE tokenizer
on environment text so that prompts are short, give it a ChatML-style chat
template, and save a randomly initialised ``LlamaForCausalLM`` next to it.

Embeddings are untied by default: on the vLLM CPU build an in-place weight
reload leaves a tied output head stale (MACHINE_NOTES.md); the serving engine
repairs tied heads after each reload (see ``worker_ext.py``) and a test covers
both layouts.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]
# The agent protocol's tags (services/envs/protocol.py), one ordinary token each: byte-level BPE
# never merges across "<", ">" and "/", so "<think></think><action>...</action>" cost 10 of a
# quick-start answer's ~14 tokens, and every token is one more decode step of the rollout.
PROTOCOL_TOKENS = ["<think>", "</think>", "<action>", "</action>"]
# Recorded with each warm start (services/sft.py), so a model built by an older recipe is rebuilt:
# 1 = before PROTOCOL_TOKENS, 2 = with them.
TOKENIZER_VERSION = 2

# ChatML-style: each message is "<|im_start|>role\ncontent<|im_end|>\n"; the
# generation prompt opens an assistant turn. The model stops at <|im_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Used by `proxmo build-model` when no corpus is given: a few lines in the style of
# text-game observations so that common words become single tokens.
DEFAULT_CORPUS = [
    "You are in the kitchen. You see a fridge, a counter and a table.",
    "You pick up the apple. You put the apple in the fridge.",
    "Valid actions: look, inventory, open fridge, close fridge, take apple, go north.",
    "You are in the living room. There is a sofa and a bookcase. Exits: north, east.",
    "Your task is to put away the items in their proper places.",
    "<action>take red apple from table</action>",
    "<action>put red apple in fridge</action>",
    "The door is closed. You open the door. You move to the corridor.",
    "Score: 1. Task completed. Well done!",
]


def _train_tokenizer(corpus: Iterable[str], vocab_size: int):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((line for line in corpus if line), trainer=trainer)
    # Not special: they are part of the answer text, which the engine detokenizes with special tokens skipped.
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in PROTOCOL_TOKENS])
    return tok


def build_tiny_model(
    out_dir: str | Path,
    corpus: Iterable[str],
    *,
    vocab_size: int = 2048,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 2,
    intermediate: int = 352,
    max_position: int = 512,
    tie_embeddings: bool = False,
    seed: int = 0,
) -> Path:
    """Train the tokenizer on ``corpus`` and save tokenizer + random model into ``out_dir``.

    The BPE vocabulary may come out smaller than ``vocab_size`` on a small corpus
    (it saturates); the model's embedding matrix uses the real tokenizer size.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = list(corpus)
    if not any(line.strip() for line in corpus):
        raise ValueError("build_tiny_model: the corpus is empty")
    if hidden % heads:
        raise ValueError(f"build_tiny_model: hidden ({hidden}) must be divisible by heads ({heads})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = _train_tokenizer(corpus, vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END], model_max_length=max_position,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    n_vocab = len(tokenizer)
    config = LlamaConfig(
        vocab_size=n_vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_position, tie_word_embeddings=tie_embeddings,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=[tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        rms_norm_eps=1e-5, rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # vLLM reads the stop tokens of a chat model from generation_config.json.
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "pad_token_id": config.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


def _read_corpus(paths: list[str]) -> list[str]:
    lines: list[str] = []
    for p in paths:
        lines.extend(Path(p).read_text(encoding="utf-8").splitlines())
    return lines


def main(argv: list[str] | None = None) -> int:
    """`proxmo build-model --out DIR [--corpus FILE ...]`: build the tiny model folder."""
    ap = argparse.ArgumentParser(prog="proxmo build-model", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (Hugging Face layout)")
    ap.add_argument("--corpus", action="append", default=[],
                    help="text file(s), one sample per line (default: a small built-in corpus)")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=352)
    ap.add_argument("--max-position", type=int, default=512)
    ap.add_argument("--tie-embeddings", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    corpus = _read_corpus(args.corpus) if args.corpus else DEFAULT_CORPUS
    out = build_tiny_model(
        args.out, corpus, vocab_size=args.vocab_size, hidden=args.hidden, layers=args.layers,
        heads=args.heads, intermediate=args.intermediate, max_position=args.max_position,
        tie_embeddings=args.tie_embeddings, seed=args.seed,
    )
    print(f"tiny model written to {out}")
    return 0
