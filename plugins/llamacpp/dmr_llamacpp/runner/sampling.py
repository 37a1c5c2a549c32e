"""Per-request sampling parameters and the llama sampler chain built from them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from dmr_llamacpp.runner.logit_bias import BiasPairs

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
    typical_p: float = 1.0  # 1: off
    mirostat: int = 0  # 1, 2: Mirostat's version, which replaces top-k/typical/top-p/min-p
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
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
    logit_bias: BiasPairs = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def penalising(self) -> bool:
        """Whether the chain holds llama.cpp's penalty sampler (`_penalties`)."""
        return (
            self.repeat_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def plain_greedy(self) -> bool:
        """Whether the chain is llama.cpp's greedy sampler alone (`build_sampler_chain`):
        its token is then the highest logit, which the runner reads itself
        (`LoadedModel.greedy_token`) instead of calling the chain."""
        return (
            self.temperature <= 0
            and not self.grammar
            and not self.logit_bias
            and not self.penalising
        )

    @property
    def reproducible(self) -> bool:
        """Whether the same prompt must give the same answer: greedy, or seeded."""
        return self.seed is not None or self.temperature <= 0 or self.top_k == 1


def build_sampler_chain(
    params: SamplingParams, vocab: Any, n_vocab: int, *, history: Sequence[int] = (), n_ctx: int = 0
) -> Any:
    """llama-server's chain (common/sampling.cpp): grammar, logit biases, penalties,
    then greedy, Mirostat, or top-k/typical/top-p/min-p/temperature/dist(seed).

    The penalties start from the last `repeat_last_n` tokens of `history` (the
    prompt; -1: the whole `n_ctx`), as llama-server's do: a repeat penalty then
    weighs what the prompt already says too."""
    if params.mirostat not in (0, 1, 2):
        raise ValueError(f"mirostat must be 0, 1 or 2, not {params.mirostat}")
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
        if params.penalising:
            penalties = _penalties(params, n_vocab, history, n_ctx or n_vocab)
            llama_cpp.llama_sampler_chain_add(chain, penalties)
        if params.temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        seed = RANDOM_SEED if params.seed is None or params.seed < 0 else params.seed & 0xFFFFFFFF
        for sampler in _choosers(params, n_vocab, seed):
            llama_cpp.llama_sampler_chain_add(chain, sampler)
        return chain
    except BaseException:
        llama_cpp.llama_sampler_free(chain)
        raise


def _penalties(params: SamplingParams, n_vocab: int, history: Sequence[int], n_ctx: int) -> Any:
    last_n = params.repeat_last_n if params.repeat_last_n >= 0 else n_ctx
    penalties = llama_cpp.llama_sampler_init_penalties(
        n_vocab, last_n, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
    )
    # Image placeholders (negative ids) are not tokens: llama-server skips them too.
    tokens = [token for token in history if token >= 0]
    for token in tokens[-last_n:] if last_n > 0 else ():
        llama_cpp.llama_sampler_accept(penalties, token)
    return penalties


def _choosers(params: SamplingParams, n_vocab: int, seed: int) -> list[Any]:
    """The samplers after the penalties at a temperature above 0, in llama-server's
    order; the last one picks the token."""
    temperature = llama_cpp.llama_sampler_init_temp(params.temperature)
    if params.mirostat == 1:
        return [
            temperature,
            llama_cpp.llama_sampler_init_mirostat(
                n_vocab, seed, params.mirostat_tau, params.mirostat_eta, 100
            ),
        ]
    if params.mirostat == 2:
        return [
            temperature,
            llama_cpp.llama_sampler_init_mirostat_v2(
                seed, params.mirostat_tau, params.mirostat_eta
            ),
        ]
    samplers = []
    if params.top_k > 0:
        samplers.append(llama_cpp.llama_sampler_init_top_k(params.top_k))
    if 0 < params.typical_p < 1:
        samplers.append(llama_cpp.llama_sampler_init_typical(params.typical_p, 1))
    if 0 < params.top_p < 1:
        samplers.append(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0:
        samplers.append(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
    return [*samplers, temperature, llama_cpp.llama_sampler_init_dist(seed)]


def _logit_bias_sampler(params: SamplingParams, n_vocab: int) -> Any:
    biases = [(token, bias) for token, bias in params.logit_bias if isinstance(token, int)]
    if len(biases) != len(params.logit_bias):
        raise ValueError("logit_bias texts must be tokenized before sampling")
    array = (llama_cpp.llama_logit_bias * len(biases))(
        *(llama_cpp.llama_logit_bias(token, bias) for token, bias in biases)
    )
    # llama.cpp copies the biases into the sampler.
    return llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(biases), array)
