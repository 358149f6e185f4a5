"""vLLM worker extension: in-place weight reload that also repairs tied output heads.

vLLM mixes this class into its worker (``worker_extension_cls``), so these
methods run inside the engine process and are reached by
``collective_rpc("proxmo_reload", ...)``. Tensors cannot travel through
``collective_rpc`` (they arrive as lists), so the weights come as a folder
holding ``model.safetensors`` (written under /dev/shm by the replica).

Why the repair: with ``tie_word_embeddings`` the output head shares the
embedding Parameter, the checkpoint has no ``lm_head.weight``, and the layerwise
reload never re-processes the head. On the CPU build that processing builds a
packed copy of the weight for the GEMM kernel, so the head kept computing with
the old embedding (MACHINE_NOTES.md). After each reload we re-run the head's
``process_weights_after_loading`` when its weight is the embedding's.
"""

from __future__ import annotations

from typing import Any


def _tied_heads(model: Any) -> list[Any]:
    """Output-head modules whose weight is the same tensor as an embedding's weight."""
    embed_ptrs = set()
    for module in model.modules():
        if type(module).__name__ == "VocabParallelEmbedding":
            w = getattr(module, "weight", None)
            if w is not None and w.numel():
                embed_ptrs.add(w.data_ptr())
    heads = []
    for module in model.modules():
        if type(module).__name__ == "ParallelLMHead":
            w = getattr(module, "weight", None)
            if w is not None and w.numel() and w.data_ptr() in embed_ptrs:
                heads.append(module)
    return heads


class ProxmoWorkerExtension:
    """Methods added to every vLLM worker of a PolicyServer engine."""

    def proxmo_reload(self, weights_path: str) -> dict[str, int]:
        """Reload all weights from ``weights_path``/model.safetensors, then re-pack tied heads."""
        self.reload_weights(weights_path=weights_path)  # type: ignore[attr-defined]
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        repaired = 0
        for head in _tied_heads(model):
            method = getattr(head, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(head)
                repaired += 1
        return {"tied_heads_repaired": repaired}

    def proxmo_tied_heads(self) -> int:
        """How many output heads share their weight with an embedding (for tests and logs)."""
        return len(_tied_heads(self.model_runner.get_model()))  # type: ignore[attr-defined]
