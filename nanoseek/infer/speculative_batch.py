"""The engine's speculative step over a batch of requests (engine.py, `Engine(speculative=True)`;
DeepSeek-V3 report section 2.2, "MTP in inference"): each request's MTP draft drawn from its own
sampling settings, and the verify decision from the main model's logits of [next, draft], greedy
(the main model's argmax, so the output is plain greedy decoding's), sampled (the rejection rule,
`speculative.speculative_sample`: the target distribution exactly) or constrained (one token from
the masked logits, not drafted); around them, the first drafts at admission (`first_drafts`) and
the verify-then-draft-again half of a decode step (`verify_and_redraft`). Requests are the
engine's (request.py): `params`, `generator`, `draft`, `draft_q`, `spec`."""

from __future__ import annotations

import torch

from ..sampling import draw, sample_next, sampling_logits
from ..speculative import SpeculativeStats, draft_logits, mtp_hidden, speculative_sample
from .batch_sampling import choose_tokens


def draw_drafts(reqs: list, logits: torch.Tensor) -> None:
    """Each request's draft from the MTP logits [A, V]: the argmax for greedy (and constrained)
    requests; for sampled ones a draw from the request's own sampling distribution (temperature,
    top-k, top-p) with its generator, kept as `draft_q` for the rejection test."""
    drafts = logits.argmax(dim=-1)  # [A]
    q_rows: dict[int, torch.Tensor] = {}
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(reqs):
        p = r.params
        if p.temperature > 0 and p.constraint is None:
            key = (p.temperature, p.top_p, p.top_k) if r.generator is None else ("seeded", i)
            groups.setdefault(key, []).append(i)
    for idx in groups.values():
        p = reqs[idx[0]].params
        q = sampling_logits(logits[idx], p.temperature, p.top_p, p.top_k).softmax(dim=-1)  # [n, V]
        drafts[idx] = draw(q, reqs[idx[0]].generator)
        for j, i in enumerate(idx):
            q_rows[i] = q[j]
    for i, (r, d) in enumerate(zip(reqs, drafts.tolist())):
        r.draft, r.draft_q = d, q_rows.get(i)


def verify(reqs: list, drafts: torch.Tensor, logits: torch.Tensor):
    """Per request, from the verify logits [A, 2, V] (position 0: the token after `next`,
    position 1: the token after the draft) and drafts [A]: the kept tokens new [A, 2] (the
    second only where `accepted` [A]), their log-probs [A][2] under the main model and top
    alternatives. Greedy: the argmax at position 0 (the draft is kept when it equals it) and
    the argmax after it; sampled: `speculative_sample`; constrained: one token from the masked
    position 0, as a plain step chooses it."""
    A = len(reqs)
    new = logits.argmax(dim=-1)  # [A, 2] greedy: the main model's own tokens
    accepted = new[:, 0] == drafts  # [A]
    logp = torch.log_softmax(logits, dim=-1)  # [A, 2, V] raw: what the log-probs report
    chosen_lp = None  # [A, 2] log-probs under the sampling distribution, where a request asks for them
    greedy_sampled = [i for i, r in enumerate(reqs) if r.params.logprob_mode == "sampled"]
    if greedy_sampled:
        chosen_lp = torch.zeros(A, 2, device=logits.device)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(reqs):
        p = r.params
        if p.constraint is not None:
            accepted[i] = False
            row = p.constraint.mask(logits[i, 0])
            out = sample_next(row[None], p.temperature, p.top_p, p.top_k, r.generator,
                              with_logprobs=p.logprob_mode == "sampled")
            if p.logprob_mode == "sampled":
                new[i, 0], chosen_lp[i, 0] = out[0][0], out[1][0]
            else:
                new[i, 0] = out[0]
        elif p.temperature > 0:
            key = (p.temperature, p.top_p, p.top_k) if r.generator is None else ("seeded", i)
            groups.setdefault(key, []).append(i)
    for idx in groups.values():
        p, g = reqs[idx[0]].params, reqs[idx[0]].generator
        rows = torch.tensor(idx, device=logits.device)
        n = len(idx)
        lsp = torch.log_softmax(sampling_logits(logits[rows].flatten(0, 1), p.temperature, p.top_p, p.top_k),
                                dim=-1).view(n, 2, -1)  # [n, 2, V] the target's sampling distribution
        q = torch.stack([reqs[i].draft_q for i in idx])  # [n, V]
        u = torch.rand(n, 3, generator=g, device=logits.device)
        toks, acc = speculative_sample(lsp[:, 0].exp(), lsp[:, 1].exp(), q, drafts[rows], u)
        new[rows], accepted[rows] = toks, acc
        if chosen_lp is not None:
            chosen_lp[rows] = lsp.gather(2, toks[:, :, None])[:, :, 0]
    raw = logp.gather(2, new[:, :, None])[:, :, 0]  # [A, 2]
    if chosen_lp is not None:
        keep_raw = torch.tensor([r.params.logprob_mode != "sampled" for r in reqs], device=logits.device)
        raw = torch.where(keep_raw[:, None], raw, chosen_lp)
    tops = []
    for i, r in enumerate(reqs):
        row_tops = [None, None]
        if r.params.logprobs:
            v, idx = logp[i].topk(r.params.logprobs, dim=-1)  # [2, k]
            row_tops = [list(zip(a, b)) for a, b in zip(idx.tolist(), v.tolist())]
        tops.append(row_tops)
    return new, accepted, raw.tolist(), tops


def first_drafts(model, group: list, logits: torch.Tensor, hidden: torch.Tensor, reused: int, mtp_cache: dict,
                 device) -> list[tuple]:
    """At admission (the group's rows in order, `mtp_cache` the MTP layer's rows of them): choose
    the first token of each generating request from logits [G, V], run the MTP layer over the
    prefilled positions with hidden [G, L - reused, h], and draw each request's first draft.
    Returns the chosen (token, log-prob, top) of the generating requests (max_tokens > 0), in order."""
    gen = [k for k, r in enumerate(group) if r.params.max_tokens > 0]
    chosen = choose_tokens([group[k] for k in gen], logits[gen]) if gen else []
    if not gen:
        return chosen
    token_of = {k: c[0] for k, c in zip(gen, chosen)}
    # MTP inputs at position i: (h_i, emb(t_{i+1})); the last one's next token is the chosen one
    next_ids = torch.tensor([r.prompt[reused + 1:] + [token_of.get(k, 0)] for k, r in enumerate(group)],
                            device=device)  # [G, L - reused]
    states = mtp_hidden(model, hidden, next_ids, reused, mtp_cache)  # [G, L - reused, h]
    drafting = [group[k] for k in gen]
    draw_drafts(drafting, draft_logits(model, states[gen, -1]).float())
    for r in drafting:
        r.spec = SpeculativeStats()
    return chosen


def verify_and_redraft(model, reqs: list, tokens: torch.Tensor, start: torch.Tensor, kv_len: int,
                       logits: torch.Tensor, hidden: torch.Tensor, mtp_cache: dict, device):
    """After the main model's forward of tokens [A, 2] ([next, draft] per row, from positions
    start [A]) gave logits [A, 2, V] and hidden [A, 2, h]: keep 1 or 2 tokens per request
    (`verify`), then draft again from the MTP layer (`mtp_cache`: its rows 0..A) at the last kept
    token. Returns the kept tokens new [A, 2], accepted [A], their log-probs and top alternatives
    (`verify`'s) and the number kept per request (a list)."""
    A = len(reqs)
    new, accepted, lps, tops = verify(reqs, tokens[:, 1], logits.float())
    n_new = 1 + accepted.long()  # [A]
    # next drafts, while the rows are still in this step's order: MTP inputs (h_pos, emb(new_0))
    # and, for an accepted draft, (h_pos+1, emb(new_1)); a rejected row's second entry sits past
    # its end and is overwritten next step
    states = mtp_hidden(model, hidden, new, start, mtp_cache, kv_len=kv_len, impl="absorb")  # [A, 2, h]
    last = states[torch.arange(A, device=device), n_new - 1]  # [A, h]
    draw_drafts(reqs, draft_logits(model, last).float())
    return new, accepted, lps, tops, n_new.tolist()
