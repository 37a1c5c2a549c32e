"""Per-request sampling parameters and the llama sampler chain built from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import llama_cpp

__all__ = ["GrammarError", "SamplingParams", "build_sampler_chain"]

RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp picks a random seed


class GrammarError(ValueError):
    """llama.cpp refused the GBNF grammar."""


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling. The sampler fields have no defaults of their own:
    `WorkerSettings` (the runner's `--temp`, `--top-k`, ...) holds them, and
    `sampling_from_body` fills each from the request or from there."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    repeat_last_n: int
    presence_penalty: float
    frequency_penalty: float
    seed: int | None  # None: a random seed
    grammar: str | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    # None: no logprobs; N >= 0: the chosen token's logprob plus N alternatives.
    logprobs: int | None = None
    ignore_eos: bool = False
    # llama-server's `cache_prompt`: False decodes the whole prompt afresh, as a server
    # that never served it would (results then do not depend on earlier requests).
    cache_prompt: bool = True
    # (token id, bias) pairs once `generation_routes` has tokenized the texts among
    # them (runner/logit_bias.py); -inf never samples the token.
    logit_bias: tuple[tuple[int | str, float], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def reproducible(self) -> bool:
        """Whether the same prompt must give the same answer: greedy, or seeded."""
        return self.seed is not None or self.temperature <= 0 or self.top_k == 1


def build_sampler_chain(params: SamplingParams, vocab: Any, n_vocab: int) -> Any:
    """A chain: grammar, logit biases, penalties, then greedy or
    top-k/top-p/min-p/temperature/dist(seed) (llama-server's order)."""
    chain_params = llama_cpp.llama_sampler_chain_default_params()
    chain_params.no_perf = True
    chain = llama_cpp.llama_sampler_chain_init(chain_params)
    try:
        if params.grammar:
            grammar = llama_cpp.llama_sampler_init_grammar(
                vocab, params.grammar.encode("utf-8"), b"root"
            )
            if not grammar:
                raise GrammarError("the grammar could not be parsed")
            llama_cpp.llama_sampler_chain_add(chain, grammar)
        if params.logit_bias:
            llama_cpp.llama_sampler_chain_add(chain, _logit_bias_sampler(params, n_vocab))
        penalising = (
            params.repeat_penalty != 1.0
            or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0
        )
        if penalising:
            last_n = params.repeat_last_n if params.repeat_last_n >= 0 else n_vocab
            # llama.cpp dropped the leading n_vocab argument while this binding still
            # passes five; giving last_n twice is right for either C signature.
            llama_cpp.llama_sampler_chain_add(
                chain,
                llama_cpp.llama_sampler_init_penalties(
                    last_n,
                    last_n,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                ),
            )
        if params.temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        if params.top_k > 0:
            llama_cpp.llama_sampler_chain_add(
                chain, llama_cpp.llama_sampler_init_top_k(params.top_k)
            )
        if 0 < params.top_p < 1:
            llama_cpp.llama_sampler_chain_add(
                chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1)
            )
        if params.min_p > 0:
            llama_cpp.llama_sampler_chain_add(
                chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1)
            )
        llama_cpp.llama_sampler_chain_add(
            chain, llama_cpp.llama_sampler_init_temp(params.temperature)
        )
        seed = RANDOM_SEED if params.seed is None or params.seed < 0 else params.seed & 0xFFFFFFFF
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
        return chain
    except BaseException:
        llama_cpp.llama_sampler_free(chain)
        raise


def _logit_bias_sampler(params: SamplingParams, n_vocab: int) -> Any:
    biases = [(token, bias) for token, bias in params.logit_bias if isinstance(token, int)]
    if len(biases) != len(params.logit_bias):
        raise ValueError("logit_bias texts must be tokenized before sampling")
    array = (llama_cpp.llama_logit_bias * len(biases))(
        *(llama_cpp.llama_logit_bias(token, bias) for token, bias in biases)
    )
    # llama.cpp copies the biases into the sampler.
    return llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(biases), array)
