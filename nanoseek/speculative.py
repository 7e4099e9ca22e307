"""MTP speculative decoding (DeepSeek-V3 report section 2.2, "MTP in inference"): the model's own
multi-token-prediction module drafts the token after next; the main model verifies the draft and
its own next token in one forward of two tokens. Greedy output is identical to plain greedy
decoding; each accepted draft saves one main-model step.

Caches: the main model's latent cache, and one latent cache for the (first) MTP layer, whose
attention runs over the MTP inputs (h_i, emb(t_{i+1})) of every earlier position. Entries written
for a rejected draft sit past the sequence end and are overwritten by the next step.

Here too is what the engine's speculative mode (infer/engine.py, `Engine(speculative=True)`) builds on:
`mtp_hidden`, the MTP layer over a batch of positions with its own cache, and
`speculative_sample`, the rejection rule of speculative sampling (Leviathan et al. 2023, "Fast
Inference from Transformers via Speculative Decoding"; Chen et al. 2023) that keeps the sampled
tokens' distribution exactly the target model's."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import invert_cdf


@dataclass
class SpeculativeStats:
    """Drafts made, drafts the main model accepted, and main-model steps. In the engine a step is
    one request's share of a verify forward (so `tokens_per_step` is per request, whatever the
    batch); in `generate_speculative` the prefill counts as one more step."""
    drafted: int = 0
    accepted: int = 0
    main_steps: int = 0

    def add(self, other: "SpeculativeStats") -> None:
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.main_steps += other.main_steps

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return (self.drafted + self.accepted) / self.main_steps if self.main_steps else 0.0


@torch.no_grad()
def generate_speculative(model, input_ids: torch.Tensor, max_new_tokens: int,
                         eos_token_id: int | None = None) -> tuple[torch.Tensor, SpeculativeStats]:
    """Greedy generation for one sequence [1, T] with MTP drafts; returns (ids, stats)."""
    if input_ids.shape[0] != 1:
        raise ValueError("speculative decoding handles one sequence at a time (batch 1)")
    if len(model.mtp) == 0:
        raise ValueError("speculative decoding needs a checkpoint with MTP layers (num_nextn_predict_layers >= 1)")
    mtp = next(iter(model.mtp.values()))
    T = input_ids.shape[1]
    max_len = T + max_new_tokens + 2
    cache = model.make_cache(1, max_len)
    mcache = model.make_layer_cache(1, max_len, device=input_ids.device)  # the MTP layer's own
    embed = model.model.embed_tokens
    stats = SpeculativeStats()

    def draft_from(h, next_ids, pos):
        """MTP over positions pos.. with inputs (h_i, emb(t_{i+1})); the draft for the token after."""
        inputs = model.attn_inputs(h.shape[1], pos, h.device, mcache)
        hk = mtp(h, embed(next_ids), model.rotary(inputs.positions(h.shape[1])), mcache, inputs)
        return int(model.lm_head(mtp.shared_head.norm(hk[:, -1:])).argmax(-1))

    logits, hidden = model(input_ids, cache=cache, return_hidden=True)
    nxt = int(logits[0, -1].argmax())
    out = input_ids[0].tolist() + [nxt]
    stats.main_steps += 1
    draft = draft_from(hidden, torch.tensor([out[1:]], device=input_ids.device), 0)
    pos = T  # cache slot of `nxt`
    while len(out) - T < max_new_tokens and nxt != eos_token_id:
        pair = torch.tensor([[nxt, draft]], device=input_ids.device)
        logits, hidden = model(pair, start_pos=pos, cache=cache, return_hidden=True)
        stats.main_steps += 1
        stats.drafted += 1
        first = int(logits[0, 0].argmax())
        if first == draft:  # accepted: the draft and the model's token after it
            stats.accepted += 1
            new = [draft, int(logits[0, 1].argmax())]
            h = hidden[:, :2]
        else:
            new = [first]
            h = hidden[:, :1]
        new = new[: max_new_tokens - (len(out) - T)]
        if eos_token_id is not None and eos_token_id in new:
            new = new[: new.index(eos_token_id) + 1]
        out += new
        if len(out) - T >= max_new_tokens or new[-1] == eos_token_id:
            break
        draft = draft_from(h[:, : len(new)], torch.tensor([new], device=input_ids.device), pos)
        nxt, pos = new[-1], pos + len(new)
    return torch.tensor([out], device=input_ids.device), stats


def mtp_hidden(model, hidden: torch.Tensor, next_ids: torch.Tensor, start_pos, cache, kv_len: int | None = None,
               impl: str | None = None) -> torch.Tensor:
    """The first MTP layer over T positions from `start_pos` (an int, or a LongTensor [B] per row):
    inputs (h_i, emb(t_{i+1})) with hidden [B, T, h] the main model's final-normed states and
    next_ids [B, T] the tokens after them; writes its own latent `cache` (one layer's, rows of the
    batch) and returns its states [B, T, h]. `draft_logits` of position i predict token i+2."""
    mtp = next(iter(model.mtp.values()))
    T = next_ids.shape[1]
    inputs = model.attn_inputs(T, start_pos, hidden.device, cache, kv_len=kv_len, impl=impl)
    return mtp(hidden, model.model.embed_tokens(next_ids), model.rotary(inputs.positions(T)), cache, inputs)


def draft_logits(model, states: torch.Tensor) -> torch.Tensor:
    """MTP states [..., h] -> the draft logits [..., V] through the MTP norm and the shared head."""
    mtp = next(iter(model.mtp.values()))
    return model.lm_head(mtp.shared_head.norm(states))


def speculative_sample(p_first: torch.Tensor, p_next: torch.Tensor, q: torch.Tensor, draft: torch.Tensor,
                       u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One verify step of speculative sampling per row.

    p_first [B, V]: the target's sampling distribution for the draft's position; p_next [B, V]: the
    target's for the token after the draft (given the draft); q [B, V]: the distribution the draft
    [B] was drawn from; u [B, 3]: independent uniform numbers in [0, 1).

    The draft x is accepted with probability min(1, p(x) / q(x)) (u[:, 0] q(x) < p(x)); then the
    token after it is drawn from p_next with u[:, 2]. A rejected draft is replaced by a draw from
    norm(max(0, p - q)) with u[:, 1]. Either way the first token is distributed exactly as
    p_first. Returns (tokens [B, 2], accepted [B] bool); a rejected row's second token is unused."""
    p, q = p_first.double(), q.double()
    px = p.gather(1, draft[:, None])[:, 0]  # [B]
    qx = q.gather(1, draft[:, None])[:, 0]
    accepted = u[:, 0].double() * qx < px
    residual = (p - q).clamp_min(0)  # [B, V]
    # p == q up to rounding leaves no residual mass: such a draft is accepted but for rounding
    empty = residual.sum(dim=-1) <= 0
    residual = torch.where(empty[:, None], p, residual)
    replaced = invert_cdf(residual, u[:, 1])
    after = invert_cdf(p_next, u[:, 2])
    first = torch.where(accepted, draft, replaced)
    return torch.stack([first, after], dim=1), accepted
