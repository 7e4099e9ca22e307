"""MTP speculative decoding (DeepSeek-V3 report section 2.2, "MTP in inference"): the model's own
multi-token-prediction module drafts the token after next; the main model verifies the draft and
its own next token in one forward of two tokens. Greedy output is identical to plain greedy
decoding; each accepted draft saves one main-model step.

Caches: the main model's latent cache, and one latent cache for the (first) MTP layer, whose
attention runs over the MTP inputs (h_i, emb(t_{i+1})) of every earlier position. Entries written
for a rejected draft sit past the sequence end and are overwritten by the next step."""

from __future__ import annotations

from dataclasses import dataclass

import torch



@dataclass
class SpeculativeStats:
    drafted: int = 0
    accepted: int = 0
    main_steps: int = 0

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
