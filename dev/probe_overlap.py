"""Would overlapping GRPO's rollouts and updates pay on 2 cores? Times one of them in a loop on a
given number of threads (run two of these pinned to one core each to see them side by side).

    python dev/probe_overlap.py gen 8 1 runs/quickstart/pretrain & python dev/probe_overlap.py upd 8 1 runs/quickstart/pretrain
    (prefix each with `taskset -c 0` / `taskset -c 1` to pin them)
"""
import sys, time, torch, contextlib
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
from nanoseek.model import DeepSeekV3
role, n = sys.argv[1], int(sys.argv[2])
P = sys.argv[4] if len(sys.argv) > 4 else "runs/quickstart/pretrain"
m = DeepSeekV3.from_pretrained(P)
if role == "gen":
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.engine import Engine, SamplingParams
    from nanoseek.tasks import Countdown
    from nanoseek.tasks.evaluate import encode_prompts
    m.eval()
    tok = Tokenizer.from_dir(P)
    probs = [p for _, p in zip(range(32), Countdown(n_numbers=3).stream(seed=0))]
    prompts = encode_prompts(tok, probs)
    rep = [p for p in prompts for _ in range(8)]
    eng = Engine(m, tok, max_context=2 * max(map(len, prompts)) + 48, max_batch=256, device=torch.device('cpu'))
    sp = SamplingParams(max_tokens=40, temperature=0.7)
    step = lambda: eng.generate(rep, sp)  # noqa: E731
else:
    from nanoseek.rl.grpo import completion_logprobs
    m.train()
    seqs = torch.randint(3, m.config.vocab_size, (200, 50))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-6)
    def step():
        lp, ent = completion_logprobs(m, seqs, 0.7, contextlib.nullcontext(), entropy=True)
        lp.mean().backward(); opt.step(); opt.zero_grad()
step()
t = time.time()
for _ in range(n):
    step()
print(role, "s/iter", round((time.time() - t) / n, 3), flush=True)
