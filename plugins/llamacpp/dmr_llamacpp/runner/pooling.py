"""Pooled embeddings and reranking scores, on the decode thread's own context."""

from __future__ import annotations

import threading

import numpy as np

from dmr_llamacpp.runner.model import Batch, LoadedModel

__all__ = ["Pooler"]


class Pooler:
    """Embeds several inputs per decode, one sequence each; a lock keeps the context single-user.

    Pooling runners have no generation state to share, so a lock around each
    batched decode is enough here (continuous batching matters for generation).
    """

    def __init__(self, model: LoadedModel, *, rank_head: bool) -> None:
        self.model = model
        self.rank_head = rank_head
        self._lock = threading.Lock()
        self._batch = Batch(model.options.n_batch)

    def embed(self, inputs: list[list[int]]) -> list[np.ndarray]:
        """Normalised pooled embeddings, in input order."""
        return [self._normalise(vector) for vector in self._pool(inputs, self.model.n_embd)]

    def rank(self, pairs: list[list[int]]) -> list[float]:
        """The classification head's score for each query+document token list."""
        return [float(vector[0]) for vector in self._pool(pairs, max(1, self.model.n_cls_out))]

    @staticmethod
    def _normalise(vector: np.ndarray) -> np.ndarray:
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm > 0 else vector

    def _pool(self, inputs: list[list[int]], size: int) -> list[np.ndarray]:
        limit = self.model.options.n_batch
        for tokens in inputs:
            if not tokens:
                raise ValueError("an input is empty")
            if len(tokens) > limit:
                raise ValueError(
                    f"an input has {len(tokens)} tokens, more than the {limit} the runner can pool"
                )
        results: list[np.ndarray] = []
        with self._lock:
            start = 0
            while start < len(inputs):
                group: list[list[int]] = []
                used = 0
                while (
                    start + len(group) < len(inputs)
                    and len(group) < self.model.options.n_seq_max
                    and used + len(inputs[start + len(group)]) <= limit
                ):
                    used += len(inputs[start + len(group)])
                    group.append(inputs[start + len(group)])
                self._batch.clear()
                for seq_id, tokens in enumerate(group):
                    for position, token in enumerate(tokens):
                        self._batch.add(token, position, seq_id, wants_logits=True)
                try:
                    status = self._batch.decode(self.model)
                    if status != 0:
                        raise RuntimeError(f"llama_decode failed ({status})")
                    results.extend(self.model.embedding(seq, size) for seq in range(len(group)))
                finally:
                    self.model.forget_all()
                start += len(group)
        return results
