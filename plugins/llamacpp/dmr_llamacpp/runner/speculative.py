"""Draft-model proposals for speculative decoding inside the continuous-batching loop.

A small draft model with the target's vocabulary keeps its own KV cache per
slot. Each step it proposes up to `max_tokens` greedy tokens for every
generating slot (one batched draft decode per proposed position); the target
then checks all of them in its one batched decode (see `BatchedGenerator`),
keeping the longest prefix its own sampler agrees with, as llama-server does.
Proposals stop early when the draft is unsure (`p_min`, llama.cpp's
`--draft-p-min`): unlikely drafts cost target compute and are rarely accepted.
"""

from __future__ import annotations

import llama_cpp
import numpy as np

from dmr_llamacpp.runner.model import Batch, LoadedModel
from dmr_llamacpp.runner.prompt_cache import common_prefix_length

__all__ = ["DraftRequest", "Drafter"]

DraftRequest = tuple[list[int], int]  # (the slot's tokens incl. the next one, most drafts)


class Drafter:
    def __init__(self, model: LoadedModel, *, max_tokens: int, p_min: float) -> None:
        self.model = model
        self.max_tokens = max_tokens
        self.p_min = p_min
        self._batch = Batch(model.options.n_batch)
        self._cached: dict[int, list[int]] = {}  # seq id -> tokens in the draft's KV cache
        self.proposed_total = 0
        self.accepted_total = 0

    def forget(self, seq_id: int) -> None:
        if self._cached.pop(seq_id, None):
            self.model.forget_sequence(seq_id)

    def close(self) -> None:
        self._batch.free()
        self.model.close()

    def propose(self, requests: dict[int, DraftRequest]) -> dict[int, list[int]]:
        """Greedy draft tokens per sequence id; an empty list where the draft is unsure."""
        drafts: dict[int, list[int]] = {seq_id: [] for seq_id in requests}
        pending = {
            seq_id: self._catch_up(seq_id, tokens) for seq_id, (tokens, _) in requests.items()
        }
        limits = {seq_id: limit for seq_id, (_, limit) in requests.items()}
        # The tokens the draft has not seen yet, in batch-sized chunks; each sequence's
        # first proposal comes from the logits of its last token.
        while any(pending.values()):
            outputs = self._fill(pending)
            self._decode()
            for seq_id, index in outputs.items():
                self._take(drafts, limits, seq_id, index)
        # Then one decode per further proposed position, every still-sure sequence at once.
        while True:
            growing = [
                seq_id
                for seq_id, draft in drafts.items()
                if draft and len(draft) < limits[seq_id] and draft[-1] >= 0
            ]
            if not growing:
                break
            self._batch.clear()
            outputs = {}
            for seq_id in growing:
                token = drafts[seq_id][-1]
                cached = self._cached[seq_id]
                outputs[seq_id] = self._batch.add(token, len(cached), seq_id, wants_logits=True)
                cached.append(token)
            self._decode()
            for seq_id, index in outputs.items():
                self._take(drafts, limits, seq_id, index)
        proposals = {seq_id: [t for t in draft if t >= 0] for seq_id, draft in drafts.items()}
        self.proposed_total += sum(len(draft) for draft in proposals.values())
        return proposals

    def _catch_up(self, seq_id: int, tokens: list[int]) -> list[int]:
        """Trim the draft's cache to what it shares with `tokens`; return the rest to feed."""
        cached = self._cached.setdefault(seq_id, [])
        # Feed at least the last token, for its logits.
        common = min(common_prefix_length(cached, tokens), len(tokens) - 1)
        if common < len(cached):
            llama_cpp.llama_memory_seq_rm(self.model.memory, seq_id, common, -1)
            del cached[common:]
        return tokens[common:]

    def _fill(self, pending: dict[int, list[int]]) -> dict[int, int]:
        self._batch.clear()
        outputs: dict[int, int] = {}
        for seq_id, tokens in pending.items():
            if not tokens or self._batch.room == 0:
                continue
            chunk = tokens[: self._batch.room]
            cached = self._cached[seq_id]
            for offset, token in enumerate(chunk):
                last = offset == len(tokens) - 1
                index = self._batch.add(token, len(cached), seq_id, wants_logits=last)
                cached.append(token)
                if last:
                    outputs[seq_id] = index
            pending[seq_id] = tokens[len(chunk) :]
        return outputs

    def _decode(self) -> None:
        status = self._batch.decode(self.model)
        if status != 0:
            raise RuntimeError(f"draft decode failed (llama_decode={status})")

    def _take(
        self, drafts: dict[int, list[int]], limits: dict[int, int], seq_id: int, index: int
    ) -> None:
        """Append the draft's greedy token, or a -1 marker that ends this sequence's draft."""
        logits = self.model.logits(index)
        token = int(np.argmax(logits))
        probability = 1.0 / float(np.exp(logits - logits[token]).sum())
        sure = probability >= self.p_min and not self.model.is_end_of_generation(token)
        if limits[seq_id] > 0:
            drafts[seq_id].append(token if sure else -1)
