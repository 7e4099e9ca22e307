"""Fine-tuning: only assistant tokens are labels, packed rows equal separate forwards, LoRA equals
its merged weights and trains only the adapters (resuming exactly), a short SFT on a real
instruction set lowers validation loss, bad records are reported and skipped, distillation
through the engine (plumbing; the accuracy comparison with a gold-answer control is slow)."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import SHARED_DATA, randomized_model
from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.infer.chat import EOS, render_chat
from nanoseek.finetune.lora import adapters, apply_lora, base_weights, merge_lora
from nanoseek.finetune.sft import IGNORE, PackedBatches, SFTOptions, encode_example, load_examples, make_example, pack, record_messages, run_sft
from nanoseek.tokenizer import Tokenizer, train_bpe
from nanoseek.train import TrainArgs, mtp_targets, token_cross_entropy

INSTRUCT = os.path.join(SHARED_DATA, "instruct_rasbt", "instruction-data.json")
WORDS = "the cat sat on a mat and then it ran to see what was there hello bye why answer think".split()


@pytest.fixture(scope="module")
def tok():
    g = random.Random(0)
    return train_bpe([" ".join(g.choice(WORDS) for _ in range(3000))], 300)


def small_cfg(vocab: int, **kw) -> ModelConfig:
    """2 layers (dense, then MoE with a shared expert), MTP depth 1."""
    return ModelConfig.from_preset(
        "nano", vocab_size=vocab, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        max_position_embeddings=256, **kw)


def save_model(path, tok, seed=0) -> str:
    model = DeepSeekV3.from_config(small_cfg(tok.vocab_size), seed=seed)
    model.save_pretrained(str(path))
    tok.save(str(path))
    return str(path)


def label_runs(tok, ids, mask) -> list[str]:
    """The decoded maximal runs of trained tokens."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# ------------------------------------------------------------------------------ rendering and masking
def test_labels_are_the_assistant_tokens_only(tok):
    msgs = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello cat"},
            {"role": "assistant", "content": "<think>why</think>the mat"}, {"role": "user", "content": "and then"},
            {"role": "assistant", "content": "<think>it ran</think>bye"}]
    ids, mask = encode_example(tok, msgs)
    # earlier turn as the R1 template renders it (thinking dropped), the last turn with its thinking
    assert label_runs(tok, ids, mask) == ["the mat" + EOS, "<think>it ran</think>bye" + EOS]
    # what precedes the last turn is exactly the inference prompt
    prompt = tok.encode(render_chat(tok, msgs[:4], add_generation_prompt=True))
    assert ids[:len(prompt)] == prompt and not any(mask[len(prompt) - 3:len(prompt)])

    alpaca = record_messages({"instruction": "say hello", "input": "the cat", "output": "hello"})
    assert alpaca == [{"role": "user", "content": "say hello\n\nthe cat"}, {"role": "assistant", "content": "hello"}]
    pc = record_messages({"prompt": "why", "completion": "the answer"})
    assert label_runs(tok, *encode_example(tok, pc)) == ["the answer" + EOS]
    think = record_messages({"messages": [{"role": "user", "content": "why"},
                                          {"role": "assistant", "content": "bye", "reasoning_content": "then"}]})
    assert label_runs(tok, *encode_example(tok, think)) == ["<think>\nthen\n</think>\n\nbye" + EOS]


def test_loss_counts_only_assistant_tokens(tok):
    msgs = [{"role": "user", "content": "the cat sat on a mat"}, {"role": "assistant", "content": "hello there"}]
    ex = make_example(*encode_example(tok, msgs))
    model = DeepSeekV3.from_config(small_cfg(tok.vocab_size), seed=1)
    x, y = torch.from_numpy(ex.x)[None], torch.from_numpy(ex.y)[None]
    logits = model(x).detach().requires_grad_(True)
    loss = token_cross_entropy(logits, y)
    # plain reference: mean of -log p(target) over the positions whose target is an assistant token
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    terms = [-logp[t, int(y[0, t])] for t in range(y.shape[1]) if y[0, t] != IGNORE]
    assert 0 < len(terms) < y.shape[1] // 2
    assert abs(loss.item() - (sum(terms) / len(terms)).item()) < 1e-5
    (grad,) = torch.autograd.grad(loss, logits)
    counted = (y[0] != IGNORE)
    assert grad[0, ~counted].abs().max() == 0 and (grad[0, counted].abs().sum(-1) > 0).all()
    # MTP targets never cross a packed document boundary
    seg = torch.tensor([[1, 1, 1, 2, 2, 0]])
    yy = torch.arange(6)[None]
    assert mtp_targets(yy, 1, seg).tolist() == [[1, 2, IGNORE, 4, IGNORE]]


# ------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_packed_forward_equals_separate_forwards(tiny_cfg, impl):
    model = randomized_model(tiny_cfg, seed=3)  # MTP depth 2, group routing with bias, YaRN
    g = torch.Generator().manual_seed(0)
    examples = [make_example(torch.randint(3, 128, (n,), generator=g).tolist(), [True] * n) for n in (8, 13, 6)]
    rows = pack(examples, 32, pad_id=2)
    assert len(rows["x"]) == 1 and sorted(set(rows["seg"][0].tolist())) == [0, 1, 2, 3]
    x, y, pos, seg = PackedBatches(rows, 1).get(0)
    with torch.no_grad():
        logits, hidden = model(x, positions=pos, segment_ids=seg, attn_impl=impl, return_hidden=True)
        mtp = model.mtp_forward(hidden, x, positions=pos, segment_ids=seg)
        for s in (1, 2, 3):
            where = (seg[0] == s).nonzero()[:, 0]
            lo, n = int(where[0]), len(where)
            assert pos[0, lo:lo + n].tolist() == list(range(n))
            xs = x[:, lo:lo + n]
            alone, h_alone = model(xs, attn_impl=impl, return_hidden=True)
            torch.testing.assert_close(logits[:, lo:lo + n], alone)
            for k, (lg_p, lg_a) in enumerate(zip(mtp, model.mtp_forward(h_alone, xs)), start=1):
                torch.testing.assert_close(lg_p[:, lo:lo + n - k], lg_a)  # positions whose target is inside
        assert torch.equal(y[0, seg[0] == 0], torch.full_like(y[0, seg[0] == 0], IGNORE))  # padding learns nothing


# ------------------------------------------------------------------------------ LoRA
def test_lora_equals_reference_and_merged(tmp_path, tiny_cfg):
    model = randomized_model(tiny_cfg.replace(num_nextn_predict_layers=1), seed=4)
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        base = model(ids)
    names = apply_lora(model, rank=3, alpha=5.0)
    assert any("experts.gate_proj" in n for n in names) and any("kv_b_proj" in n for n in names)
    assert any("shared_experts" in n for n in names) and any(n.startswith("mtp.") for n in names)
    assert not any(".gate.weight" in n or "norm" in n or "embed" in n or "lm_head" in n for n in names)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), base)  # B = 0: unchanged until trained
        for _, _, d in adapters(model).values():
            d.lora_B.normal_(0, 0.2)
        # plain references: a Linear as x W^T + s (x A^T) B^T, an expert stack per expert
        attn = model.model.layers["0"].self_attn.q_a_proj
        d = adapters(model)["model.layers.0.self_attn.q_a_proj.weight"][2]
        x = torch.randn(5, 64)
        W0 = attn.parametrizations.weight.original
        torch.testing.assert_close(attn(x), x @ W0.t() + (5.0 / 3) * (x @ d.lora_A.t()) @ d.lora_B.t())
        ex = model.model.layers["1"].mlp.experts
        d = adapters(model)["model.layers.1.mlp.experts.up_proj"][2]
        for e in range(ex.n_experts):
            want = ex.parametrizations.up_proj.original[e] + (5.0 / 3) * d.lora_B[e] @ d.lora_A[e]
            torch.testing.assert_close(ex.up_proj[e], want)
        adapted = model(ids)
        absorbed = model(ids, attn_impl="absorb")
    torch.testing.assert_close(absorbed, adapted, rtol=1e-4, atol=1e-5)  # the absorbed path sees the adapter too
    assert (adapted - base).abs().max() > 1e-3
    with base_weights(model):  # the unadapted checkpoint, for exact resume
        with torch.no_grad():
            torch.testing.assert_close(model(ids), base)
    keys = set(DeepSeekV3.from_config(model.config).state_dict())
    merge_lora(model)
    assert set(model.state_dict()) == keys  # a plain model again
    model.save_pretrained(str(tmp_path))
    again = DeepSeekV3.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), adapted)
        torch.testing.assert_close(again(ids), adapted)


def test_lora_trains_only_adapters_and_resumes_exactly(tmp_path, tok):
    base = save_model(tmp_path / "base", tok)
    recs = [{"instruction": f"say {w}", "output": f"{w} {w} the {w}"} for w in WORDS * 3]
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    common = dict(data=[data], model=base, max_steps=4, batch_size=4, seq_len=64, save_every=2, progress=False,
                  eval_every=100)
    out = run_sft(TrainArgs(out=str(tmp_path / "run"), **common), SFTOptions(lora=2))
    assert out["sft"]["mode"] == "lora-2" and 0 < out["sft"]["params_trainable"] < out["params_total"] / 3
    before = DeepSeekV3.from_pretrained(base).state_dict()
    ckpt = DeepSeekV3.from_pretrained(str(tmp_path / "run" / "checkpoints" / "step-000004")).state_dict()
    merged = DeepSeekV3.from_pretrained(str(tmp_path / "run")).state_dict()
    assert all(torch.equal(before[k], ckpt[k]) for k in before)  # checkpoints hold the untouched base
    frozen = ("norm", "embed_tokens", "lm_head", "mlp.gate.", "eh_proj")
    for k in before:
        if any(f in k for f in frozen):
            assert torch.equal(before[k], merged[k]), k
    changed = [k for k in before if not torch.equal(before[k], merged[k])]
    assert any("self_attn" in k for k in changed) and any("experts.down_proj" in k for k in changed)
    # resume from step 2: steps 3 and 4 again, identically
    first = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000004")
    os.remove(tmp_path / "run" / "final.json")
    run_sft(TrainArgs(out=str(tmp_path / "run"), resume=True, **common), SFTOptions(lora=2))
    again = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    loss = {r["step"]: r["loss"] for r in first if "loss" in r}
    assert {r["step"]: r["loss"] for r in again if "loss" in r} == loss
    resumed = DeepSeekV3.from_pretrained(str(tmp_path / "run")).state_dict()
    assert all(torch.equal(resumed[k], merged[k]) for k in merged)


# ------------------------------------------------------------------------------ real data
@pytest.mark.skipif(not os.path.exists(INSTRUCT), reason="instruct_rasbt data not present")
def test_short_sft_lowers_validation_loss(tmp_path):
    recs = json.load(open(INSTRUCT))
    tok = train_bpe([" ".join(r.values()) for r in recs], 512)
    base = save_model(tmp_path / "base", tok)
    out = run_sft(TrainArgs(data=[INSTRUCT], model=base, out=str(tmp_path / "run"), max_steps=25, batch_size=4,
                            seq_len=256, lr=3e-3, progress=False, eval_every=100), SFTOptions())
    data = out["sft"]["data"]
    assert data["records"] == 1100 and data["examples"] + data["skipped"] == 1100 and data["val_examples"] >= 50
    assert out["val_loss"] < out["val_loss_start"] - 0.5, out


# ------------------------------------------------------------------------------ bad input
def test_bad_records_are_reported_and_skipped(tmp_path, tok):
    good = {"messages": [{"role": "user", "content": "why"}, {"role": "assistant", "content": "the cat"}]}
    lines = [good, "{not json", {"instruction": "say hi"}, {"messages": [{"role": "user", "content": "hi"},
             {"role": "assistant", "content": "  "}]}, {"messages": [{"role": "bot", "content": "hi"}]},
             {"prompt": "hello"}, {"text": "hello"}, [1, 2],
             {"prompt": "the " * 80, "completion": "yes"}, good, good]
    data = write_jsonl(tmp_path / "d.jsonl", lines)
    examples, report = load_examples([data], tok, seq_len=48)
    assert report.records == 11 and len(examples) == 3
    assert dict(report.skipped) == {"invalid JSON": 1, "missing field": 3, "empty assistant turn": 1,
                                    "unknown role": 1, "bad field type": 1, "over-long": 1}
    text = report.format()
    for needle in (f"{data}:2: not valid JSON", f"{data}:3: no 'output' field", f"{data}:4: messages[1]: empty assistant",
                   f"{data}:5: messages[0].role: unknown role 'bot'", f"{data}:6: no 'completion' field",
                   f"{data}:9: ", "more than --seq-len 48"):
        assert needle in text, (needle, text)
    # truncation keeps the over-long one (its answer is gone, so it is still skipped here)
    _, rep2 = load_examples([data], tok, seq_len=48, overlong="truncate")
    assert rep2.skipped["over-long"] == 1 and "no assistant token left" in rep2.format()

    base = save_model(tmp_path / "base", tok)
    p = subprocess.run([sys.executable, "-m", "nanoseek", "sft", "--model", base, "--data", data, "--out",
                        str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "2", "--seq-len", "48",
                        "--no-progress", "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["sft"]["data"]["skipped"] == 8 and summary["step"] == 2
    assert "skipped 8 bad records" in p.stdout and "unknown role 'bot'" in p.stdout
    # nothing usable, a missing model, a .json that is not a list: one clear line, no traceback
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"messages": []}])
    (tmp_path / "obj.json").write_text('{"a": 1}')
    for argv, want in ((["--model", base, "--data", bad], "no usable fine-tuning examples"),
                       (["--model", str(tmp_path), "--data", data], "not found"),
                       (["--model", base, "--data", str(tmp_path / "obj.json")], "must hold a list of records")):
        p = subprocess.run([sys.executable, "-m", "nanoseek", "sft", *argv, "--out", str(tmp_path / "x")],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode != 0 and want in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


# ------------------------------------------------------------------------------ distillation
ALPHA = "abcdefgh"


def shift_task(letters, think: bool):
    """A toy verifiable task: shift each letter one step along a..h (h wraps to a)."""
    answer = " ".join(ALPHA[(ALPHA.index(c) + 1) % len(ALPHA)] for c in letters)
    trace = ", ".join(f"{c} {ALPHA[(ALPHA.index(c) + 1) % len(ALPHA)]}" for c in letters)
    reply = (f"<think>{trace}</think>" if think else "") + answer
    return {"prompt": "shift " + " ".join(letters), "answer": answer, "completion": reply}


def shift_setup(tmp_path):
    g = random.Random(0)
    combos = [(a, b, c) for a in ALPHA for b in ALPHA for c in ALPHA]
    g.shuffle(combos)
    tok = train_bpe(["shift " + " ".join(ALPHA) + ", " + ", ".join(ALPHA)] * 10, 300)
    return tok, combos[:300], combos[300:450], combos[450:]


def test_distill_plumbing(tmp_path):
    """A teacher that learned a fixed reply (a fixture: its greedy reply to every "shift x y z" is
    TEACHER_REPLY) answers through the engine (thinking kept), the verifier reports its pass rate,
    the student is fine-tuned on the kept replies; one command."""
    from fixtures.make_fixtures import SHIFT_TEACHER, TEACHER_REPLY
    assert TEACHER_REPLY == "<think>a b</think>b c"
    _, _, prompts, _ = shift_setup(tmp_path)
    tok = Tokenizer.from_dir(SHIFT_TEACHER)
    recs = [{"prompt": "shift " + " ".join(t), "answer": "b c" if i % 2 else "c d"} for i, t in enumerate(prompts[:12])]
    recs.append({"answer": "x"})  # a bad prompt record: reported, skipped
    student = save_model(tmp_path / "student", tok, seed=1)
    p = subprocess.run([sys.executable, "-m", "nanoseek", "distill", "--teacher", SHIFT_TEACHER,
                        "--student", student, "--prompts", write_jsonl(tmp_path / "p.jsonl", recs),
                        "--out", str(tmp_path / "out"), "--max-new-tokens", "16", "--max-steps", "2",
                        "--batch-size", "2", "--seq-len", "64", "--lora", "2", "--no-progress", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    s = json.loads(p.stdout.strip().splitlines()[-1])
    d = s["distill"]
    assert d["prompts"] == 12 and d["bad_prompts"] == 1 and d["verifier"] == "exact" and d["verified"] == 12
    assert d["passed"] == 6 and d["pass_rate"] == 0.5  # the odd ones, whose answer is the teacher's "b c"
    assert d["kept"] == d["passed"] and s["sft"]["mode"] == "lora-2" and "pass rate" in p.stdout
    kept = [json.loads(line) for line in open(tmp_path / "out" / "distill" / "train.jsonl")]
    assert all(k["messages"][-1]["content"].startswith("<think>") for k in kept)  # thinking kept
    DeepSeekV3.from_pretrained(str(tmp_path / "out"))  # the student, a plain checkpoint


@pytest.mark.slow
def test_distillation_raises_student_accuracy_next_to_gold_control(tmp_path):
    from nanoseek.finetune.distill import PromptRecord, accuracy, distill, verify_exact
    tok, train_set, prompts, test_set = shift_setup(tmp_path)
    common = dict(batch_size=16, seq_len=128, lr=3e-3, warmup_steps=10, progress=False, eval_every=1000)
    # teacher: trained here on worked solutions (thinking then answer)
    teacher_data = write_jsonl(tmp_path / "teacher.jsonl", [
        {"prompt": r["prompt"], "completion": r["completion"]} for r in (shift_task(t, True) for t in train_set)])
    run_sft(TrainArgs(data=[teacher_data], model=save_model(tmp_path / "t0", tok, seed=0), out=str(tmp_path / "teacher"),
                      max_steps=150, **common), SFTOptions())
    test = [PromptRecord([{"role": "user", "content": r["prompt"]}], r["answer"], "")
            for r in (shift_task(t, False) for t in test_set)]
    student = save_model(tmp_path / "student", tok, seed=1)

    def acc(path):
        return accuracy(DeepSeekV3.from_pretrained(path), Tokenizer.from_dir(path), test, verify_exact, 40)

    before = acc(student)
    prompts_file = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": r["prompt"], "answer": r["answer"]} for r in (shift_task(t, False) for t in prompts)])
    s = distill(str(tmp_path / "teacher"), student, prompts_file, str(tmp_path / "distilled"),
                TrainArgs(max_steps=150, **common), SFTOptions(), max_new_tokens=40, say=lambda *_: None)
    control_data = write_jsonl(tmp_path / "gold.jsonl", [
        {"prompt": r["prompt"], "completion": r["completion"]} for r in (shift_task(t, False) for t in prompts)])
    run_sft(TrainArgs(data=[control_data], model=student, out=str(tmp_path / "control"), max_steps=150, **common),
            SFTOptions())
    distilled, control = acc(str(tmp_path / "distilled")), acc(str(tmp_path / "control"))
    print(f"teacher pass rate {s['distill']['pass_rate']:.2f}; student accuracy before {before:.2f}, "
          f"distilled {distilled:.2f}, gold-answer control {control:.2f}")
    assert s["distill"]["pass_rate"] > 0.5 and s["distill"]["kept"] == s["distill"]["passed"]
    assert before < 0.05 and distilled > before + 0.5
    assert control > before + 0.5  # the gold-answer control learns the task too: the comparison is fair
