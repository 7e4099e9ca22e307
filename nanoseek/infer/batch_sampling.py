"""The engine's token choice over a batch (engine.py): each request's next token from one logits
row per request, by its own settings (greedy, or temperature / top-p / top-k sampling with its
generator, sampling.py), after its constraint's mask (grammar.py), with the chosen token's log-prob
and top alternatives; and the scoring of a prompt (each token's log-prob given those before it)
from its prefill logits. Requests are the engine's (request.py): `params`, `generator`."""

from __future__ import annotations

import torch

from ..sampling import sample_next


def score_prompt(prompt: list[int], logits: torch.Tensor, top: int) -> list:
    """Per prompt token (log-prob given the tokens before it, top alternatives); logits [L, V]
    predict the token after each position, so the first token has none."""
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)  # [L-1, V]
    target = torch.tensor(prompt[1:], device=logp.device)
    chosen = logp.gather(1, target[:, None])[:, 0].tolist()
    tops = [None] * len(chosen)
    if top:
        v, idx = logp.topk(top, dim=-1)
        tops = [list(zip(i, x)) for i, x in zip(idx.tolist(), v.tolist())]
    return [(None, None)] + list(zip(chosen, tops))


def choose_tokens(reqs: list, logits: torch.Tensor) -> list[tuple]:
    """Each request's next token from logits [A, V]: (token, its log-prob, top alternatives)."""
    logits = logits.float()
    # constrained requests choose from their masked row; the others' rows are untouched, so a
    # constrained neighbour changes no unconstrained request's token
    choose = logits
    constrained = [i for i, r in enumerate(reqs) if r.params.constraint is not None]
    if constrained:
        choose = logits.clone()
        for i in constrained:
            choose[i] = reqs[i].params.constraint.mask(logits[i])
    sampled_lp: dict[tuple, torch.Tensor] = {}  # group rows -> log-probs under the sampling distribution
    if all(r.params.temperature <= 0 for r in reqs):
        tokens = choose.argmax(dim=-1)
        greedy_sampled = [i for i, r in enumerate(reqs) if r.params.logprob_mode == "sampled"]
        if greedy_sampled:  # the chosen token had probability 1 under the sampling distribution
            sampled_lp[tuple(greedy_sampled)] = torch.zeros(len(greedy_sampled), device=logits.device)
    else:  # one sampling call per group of equal settings; seeded requests alone (reproducible)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            key = ((r.params.temperature, r.params.top_p, r.params.top_k, r.params.logprob_mode)
                   if r.generator is None else ("seeded", i))
            groups.setdefault(key, []).append(i)
        tokens = torch.empty(len(reqs), dtype=torch.long, device=logits.device)
        for idx in groups.values():
            p = reqs[idx[0]].params
            rows = torch.tensor(idx, device=logits.device)
            out = sample_next(choose[rows], p.temperature, p.top_p, p.top_k, reqs[idx[0]].generator,
                              with_logprobs=p.logprob_mode == "sampled")
            if p.logprob_mode == "sampled":
                tokens[rows], sampled_lp[tuple(idx)] = out
            else:
                tokens[rows] = out
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(1, tokens[:, None])[:, 0]
    for idx, lp in sampled_lp.items():  # (a greedy group's sample_next log-probs are 0 too)
        chosen[list(idx)] = lp
    out = []
    for i, (r, token, lp) in enumerate(zip(reqs, tokens.tolist(), chosen.tolist())):
        top = None
        if r.params.logprobs:
            v, idx = logp[i].topk(r.params.logprobs)
            top = list(zip(idx.tolist(), v.tolist()))
        out.append((token, lp, top))
    return out
