"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus: Holtzman et al.
2019, "The Curious Case of Neural Text Degeneration") sampling, and the log-probability of the
chosen token under the distribution it was drawn from (what an RL trainer needs as the behaviour
policy's probability). A pure tensor module below the models: their `generate`, the engine and
speculative decoding all draw through it."""

from __future__ import annotations

import torch


def sampling_logits(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """logits [B, V] -> the logits of the distribution sampling draws from [B, V] (fp32): divided by
    the temperature (> 0), then -inf outside the top-k and outside the top-p nucleus."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs [B, V] by inverting the cumulative distribution with a single
    uniform number per row [B] (`torch.multinomial` draws V exponentials per row, far slower on a
    CPU: dev/LOG.md, session 8). The sums are in float64 and u < total, so a zero-probability token (top-k,
    top-p) is never chosen: the first index whose cumulative mass exceeds u has positive mass."""
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)[:, 0]  # [B]
    return invert_cdf(probs, u)


def invert_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token of each row of probs [B, V] (not necessarily normalized) at the uniform number
    u [B] in [0, 1): the first index whose cumulative mass exceeds u times the row's total."""
    cdf = probs.double().cumsum(dim=-1)  # [B, V]
    total = cdf[:, -1]
    bad = ~(torch.isfinite(total) & (total > 0))
    if bad.any():
        raise ValueError(f"sampling: the probabilities of row {int(bad.nonzero()[0, 0])} are NaN, inf or all zero")
    point = u.double()[:, None] * total[:, None]  # [B, 1]
    return torch.searchsorted(cdf, point, right=True)[:, 0]


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                generator: torch.Generator | None = None, with_logprobs: bool = False):
    """logits [B, V] -> token ids [B]; temperature 0 is greedy (argmax). With `with_logprobs`, also
    the chosen tokens' log-probabilities under the sampling distribution [B] (0 for greedy)."""
    if temperature <= 0:
        tokens = logits.argmax(dim=-1)
        return (tokens, torch.zeros(tokens.shape, device=logits.device)) if with_logprobs else tokens
    logits = sampling_logits(logits, temperature, top_p, top_k)
    tokens = draw(logits.softmax(dim=-1), generator)
    if not with_logprobs:
        return tokens
    return tokens, torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
