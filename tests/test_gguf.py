"""GGUF in and out (nanoseek/gguf_file.py, nanoseek/infer/gguf_store.py): round trips in the default
suite, bad files, the store import and chat, and, where llama-cpp-python is installed, llama.cpp's
own deepseek2 on our files and nanoseek on the files of llama.cpp's converter."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tokenizers
import torch

import nanoseek.gguf_file as gf
import nanoseek.gguf_tokenizer as gt
from nanoseek.cli import main
from nanoseek.gguf_file import GGUFError, read_gguf, write_gguf
from nanoseek.infer.chat import builtin_template, render_chat
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.infer.store import Store, StoreError
from nanoseek.model import DeepSeekV3
from nanoseek.tokenizer import Tokenizer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "memorizer")
SDIST_ENV = "NANOSEEK_LLAMA_CPP_SDIST"  # llama-cpp-python's sdist (.tar.gz), for llama.cpp's converter
YARN_V3 = dict(type="yarn", factor=4.0, original_max_position_embeddings=256, beta_fast=32, beta_slow=1,
               mscale=1.0, mscale_all_dim=1.0)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(FIXTURE)


@pytest.fixture(scope="module")
def trained():
    """The memorizer fixture (trained, so greedy choices are clear), with YaRN RoPE on top."""
    model = DeepSeekV3.from_pretrained(FIXTURE, dtype=torch.float32)
    cfg = model.config.replace(rope_scaling=YARN_V3)
    yarn = DeepSeekV3.empty(cfg, dtype=torch.float32)
    yarn.load_state_dict(model.state_dict())
    return yarn


def tiny(seed=0, **kw):
    """A random tiny model: dims that are multiples of 32 (so q8_0 / q4_0 cover every matrix),
    several routed experts in groups with the balancing bias, a dense first layer."""
    from nanoseek import ModelConfig
    cfg = ModelConfig.from_preset("nano", **{**dict(
        vocab_size=352, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        num_nextn_predict_layers=0, rope_scaling=YARN_V3, max_position_embeddings=1024), **kw})
    model = DeepSeekV3.from_config(cfg, dtype=torch.float32, seed=seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias") and m.e_score_correction_bias is not None:
                m.e_score_correction_bias.normal_(0, 0.1)
    return model


def ids_of(tok, text="hello world, the quick brown fox jumps over the lazy dog"):
    return torch.tensor([tok.encode(text, add_bos=True)])


PLAIN_ROPE = {k: v for k, v in YARN_V3.items() if not k.startswith("mscale")}
VARIANTS = {  # ModelConfig changes that deepseek2 expresses (the YaRN ones through attn_factor)
    "v2-lite": dict(q_lora_rank=None, scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
                    norm_topk_prob=False, routed_scaling_factor=1.0, model_type="deepseek_v2",
                    rope_scaling={**YARN_V3, "mscale": 0.707, "mscale_all_dim": 0.707}),
    "yarn-mscale-unequal": dict(rope_scaling={**YARN_V3, "mscale": 0.5, "mscale_all_dim": 0.9}),
    "yarn-attention-factor": dict(rope_scaling={**YARN_V3, "attention_factor": 1.3, "mscale_all_dim": 0.8}),
    "yarn-no-mscale": dict(rope_scaling=PLAIN_ROPE),
    "no-rope-scaling": dict(rope_scaling=None),
    "one-expert-per-token": dict(num_experts_per_tok=1, n_group=1, topk_group=1),
    "softmax-groups-noaux": dict(scoring_func="softmax", topk_method="noaux_tc"),
    "softmax-greedy-with-groups": dict(scoring_func="softmax", topk_method="greedy", model_type="deepseek_v2"),
    "27-layers-no-q-lora": dict(num_hidden_layers=27, q_lora_rank=None),
    "all-dense": dict(n_routed_experts=0),
    "two-shared-experts": dict(n_shared_experts=2),
}


# ------------------------------------------------------------------ round trips (default suite)
@pytest.mark.parametrize("make", ["trained", "tiny", *VARIANTS])
def test_f32_round_trip_is_exact(make, trained, tok, tmp_path):
    model = trained if make == "trained" else tiny(**VARIANTS.get(make, {}))
    (path,) = write_gguf(model, tok, str(tmp_path / "m.gguf"), "f32")
    back, tok2 = read_gguf(path)
    assert back.lm_head.weight.dtype == torch.float32
    ids = ids_of(tok)
    with torch.no_grad():
        got, want = back(ids), model(ids)
    if make.startswith("yarn-"):  # factors rebuilt from float32 keys through deepseek2's formulas
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(got, want)
    a, b = model.config, back.config
    fields = ["hidden_size", "num_hidden_layers", "q_lora_rank", "kv_lora_rank", "n_routed_experts",
              "scoring_func", "routed_scaling_factor", "vocab_size", "max_position_embeddings"]
    if make in ("trained", "tiny"):  # the variants may come back as an equal computation in other terms
        fields += ["first_k_dense_replace", "n_group", "topk_group", "norm_topk_prob", "topk_method"]
    for field in fields:
        assert getattr(a, field) == getattr(b, field), field
    assert b.softmax_scale == pytest.approx(a.softmax_scale, rel=1e-6)
    assert b.rope_attention_factor == pytest.approx(a.rope_attention_factor, rel=1e-6)
    text = "Tokens <think> and émoji 🙂 survive\n\t twice  "
    assert tok2.encode(text) == tok.encode(text) and tok2.decode(tok2.encode(text)) == text
    assert (tok2.bos_id, tok2.eos_id, tok2.pad_id, tok2.chat_template) == (tok.bos_id, tok.eos_id, tok.pad_id, None)


# per-tensor bound on |read - written| / max |written|: the format's rounding (a block's scale is
# max/127 for q8_0; q4_0 clamps -max/d to 7 of -8..7, a whole step of max/8; the scale itself rounded to f16, which adds up to 127 * 2**-11 of a step);
# then the bound on the logits (None: q4_0 flips this small model's routing, so only the weights are held)
BOUNDS = {"f16": (2 ** -11, 2e-3), "bf16": (2 ** -8, 2e-2), "q8_0": (1 / 254 * 1.15, 2e-2), "q4_0": (1 / 8 * 1.02, None)}


@pytest.mark.parametrize("qtype", list(BOUNDS))
def test_encoded_round_trip_is_close(qtype, trained, tok, tmp_path):
    weight_bound, logit_bound = BOUNDS[qtype]
    (path,) = write_gguf(trained, tok, str(tmp_path / f"m-{qtype}.gguf"), qtype)
    back, _ = read_gguf(path, dtype=torch.float32)
    written = trained.state_dict()
    for name, got in back.state_dict().items():
        want = written[name]
        assert (got - want).abs().max() <= weight_bound * want.abs().max() + 1e-12, name
    if logit_bound is not None:
        ids = ids_of(tok)
        with torch.no_grad():
            ref, got = trained(ids), back(ids)
        assert ((got - ref).abs().max() / ref.abs().max()).item() < logit_bound
    default, _ = read_gguf(path)  # the file's own dtype: f16 -> float16, bf16 and blocks -> bfloat16
    assert default.lm_head.weight.dtype == (torch.float16 if qtype == "f16" else torch.bfloat16)


def test_legacy_kv_b_and_split_parts_are_read(trained, tok, tmp_path, monkeypatch):
    ids = ids_of(tok)
    with torch.no_grad():
        ref = trained(ids)
    parts = write_gguf(trained, tok, str(tmp_path / "split" / "m.gguf"), "f32", split_max_size=200_000)
    assert len(parts) > 1 and all(gf.SPLIT_PART.fullmatch(p) for p in parts)
    for source in (parts[0], str(tmp_path / "split")):
        back, _ = read_gguf(source)
        with torch.no_grad():
            assert torch.equal(back(ids), ref)

    plan = gf._plan

    def unsplit(model, qtype):  # the older files: one attn_kv_b per layer
        out = [p for p in plan(model, qtype) if "attn_v_b" not in p.name]
        for p in out:
            if "attn_k_b" in p.name:
                i = int(p.name.split(".")[1])
                p.name, p.tensor = f"blk.{i}.attn_kv_b.weight", model.model.layers[str(i)].self_attn.kv_b_proj.weight
        return out

    monkeypatch.setattr(gf, "_plan", unsplit)
    (path,) = write_gguf(trained, tok, str(tmp_path / "kvb.gguf"), "f32")
    back, _ = read_gguf(path)
    with torch.no_grad():
        assert torch.equal(back(ids), ref)


def ds3_pre_tokenizer(tok):
    """The fixture's vocabulary behind DeepSeek-V3's pre-tokenizer (llama.cpp's 'deepseek-v3')."""
    spec = json.loads(tok.tk.to_str())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False} for r in gt.DEEPSEEK3_SPLITS
    ] + [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))


TEXTS = ["hello world, the quick brown fox", "Tokens <think> and émoji 🙂 survive\n\t twice  ",
         "12345 apples 中文字符 カタカナ don't", "a\n\nb   c"]


@pytest.mark.parametrize("pre", ["gpt-2", "deepseek-v3"])
def test_tokenizer_and_chat_template_round_trip(pre, tok, tmp_path):
    t = tok if pre == "gpt-2" else ds3_pre_tokenizer(tok)
    (path,) = write_gguf(tiny(), t, str(tmp_path / "t.gguf"), "f32")
    f = gf.GGUFModelFile(path)
    assert f.get("tokenizer.ggml.pre") == pre and f.get("tokenizer.chat_template") == gt.BUILTIN_CHAT_TEMPLATE
    back = gt.read_tokenizer(f)
    for text in TEXTS:
        assert back.encode(text) == t.encode(text)
    # the Jinja form written for llama.cpp renders what the built-in template does (no tools)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "<think>x</think>\n\nyo"}, {"role": "user", "content": "again"}]
    as_jinja = Tokenizer(t.tk, chat_template=gt.BUILTIN_CHAT_TEMPLATE)
    assert render_chat(as_jinja, messages) == builtin_template(messages)


def test_one_normalized_expert_is_refused_on_import(tok, tmp_path, monkeypatch):
    model = tiny(num_experts_per_tok=1, n_group=1, topk_group=1)
    monkeypatch.setattr(gf.gguf.GGUFWriter, "add_expert_weights_norm",
                        lambda self, v: self.add_bool("deepseek2.expert_weights_norm", True))
    (path,) = write_gguf(model, tok, str(tmp_path / "k1.gguf"), "f32")
    with pytest.raises(GGUFError, match="key 'deepseek2.expert_weights_norm'"):
        read_gguf(path)


# ------------------------------------------------------------------ what cannot be written
@pytest.mark.parametrize("change,field", [
    (dict(attention="mha"), "attention"),
    (dict(n_shared_experts=0), "n_shared_experts"),
    (dict(scoring_func="softmax", topk_method="group_limited_greedy"), "topk_method"),
    (dict(num_hidden_layers=27), "q_lora_rank"),
])
def test_export_refuses_what_deepseek2_cannot_express(change, field, tok, tmp_path):
    from nanoseek import ModelConfig
    cfg = ModelConfig.from_preset("nano", **{**dict(vocab_size=352, num_nextn_predict_layers=0), **change})
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    with pytest.raises(GGUFError, match=f"field '{field}'"):
        write_gguf(model, tok, str(tmp_path / "x.gguf"), "f32")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("qtype,message", [("q5_1", "unsupported --type"), ("q2_k", "unsupported --type")])
def test_unwritable_types_are_refused(qtype, message, trained, tok, tmp_path):
    with pytest.raises(GGUFError, match=message):
        write_gguf(trained, tok, str(tmp_path / "x.gguf"), qtype)


# ------------------------------------------------------------------ bad files
@pytest.fixture
def good_file(trained, tok, tmp_path):
    return write_gguf(trained, tok, str(tmp_path / "good.gguf"), "q8_0")[0]


def test_truncated_and_corrupted_files(good_file, tmp_path):
    data = open(good_file, "rb").read()
    for name, content, message in [("truncated.gguf", data[: len(data) // 2], "truncated"),
                                   ("header.gguf", data[:100], "truncated or corrupt"),
                                   ("magic.gguf", b"GGUX" + data[4:], "truncated or corrupt"),
                                   ("empty.gguf", b"", "truncated or corrupt")]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(GGUFError, match=message) as e:
            read_gguf(str(path))
        assert str(path) in str(e.value)


def test_unknown_architecture_and_missing_key(trained, tok, tmp_path, monkeypatch):
    monkeypatch.setattr(gf, "ARCH", "llama")
    (path,) = write_gguf(trained, tok, str(tmp_path / "llama.gguf"), "f32")
    monkeypatch.undo()
    with pytest.raises(GGUFError, match="key 'general.architecture' is 'llama'") as e:
        read_gguf(path)
    assert path in str(e.value)
    monkeypatch.setattr(gf.gguf.GGUFWriter, "add_block_count", lambda self, n: None)
    (path,) = write_gguf(trained, tok, str(tmp_path / "nokey.gguf"), "f32")
    with pytest.raises(GGUFError, match="missing key 'deepseek2.block_count'"):
        read_gguf(path)


def test_missing_tensor_wrong_shape_and_unreadable_type(trained, tok, tmp_path, monkeypatch):
    plan = gf._plan
    monkeypatch.setattr(gf, "_plan", lambda m, q: [p for p in plan(m, q) if p.name != "blk.1.ffn_norm.weight"])
    (path,) = write_gguf(trained, tok, str(tmp_path / "missing.gguf"), "f32")
    with pytest.raises(GGUFError, match="missing tensor 'blk.1.ffn_norm.weight'") as e:
        read_gguf(path)
    assert path in str(e.value)

    def transposed(m, q):
        out = plan(m, q)
        for p in out:
            if p.name == "blk.0.attn_output.weight":
                p.tensor = p.tensor.t().contiguous()
        return out

    monkeypatch.setattr(gf, "_plan", transposed)
    (path,) = write_gguf(trained, tok, str(tmp_path / "shape.gguf"), "f32")
    with pytest.raises(GGUFError, match=r"tensor 'blk.0.attn_output.weight' has shape \[32, 64\], the metadata say \[64, 32\]"):
        read_gguf(path)
    monkeypatch.setattr(gf, "_plan", plan)
    (path,) = write_gguf(trained, tok, str(tmp_path / "q.gguf"), "q8_0")
    monkeypatch.setattr(gf, "READABLE_TYPES", {gf.Q.F32, gf.Q.F16})
    with pytest.raises(GGUFError, match="tensor 'token_embd.weight' has type Q8_0, which nanoseek cannot read"):
        read_gguf(path)


# ------------------------------------------------------------------ store and CLI
def run_cli(argv, monkeypatch, capsys, stdin=""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    return code, capsys.readouterr()


def test_export_create_chat_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOSEEK_HOME", str(tmp_path / "home"))
    assert run_cli(["create", "mem", "--from", FIXTURE], monkeypatch, capsys)[0] == 0
    out = str(tmp_path / "mem.gguf")
    code, cap = run_cli(["export", "mem", out, "--type", "f32"], monkeypatch, capsys)
    assert code == 0 and "wrote" in cap.out and os.path.isfile(out)
    code, cap = run_cli(["create", "memg", "--from", out], monkeypatch, capsys)
    assert code == 0 and "created 'memg:latest'" in cap.out
    manifest = Store().manifest("memg")
    assert manifest["source"] == out and manifest["architecture"] == "deepseek_v3"
    chats = [run_cli(["chat", name, "--max-tokens", "12", "--temperature", "0"], monkeypatch, capsys,
                     stdin="What is the capital of France?\n")[1].out for name in ("mem", "memg")]
    assert chats[0] == chats[1] and chats[0].strip()

    parts = tmp_path / "parts"
    code, cap = run_cli(["export", "mem", str(parts / "mem.gguf"), "--type", "q8_0", "--split-max-size", "150000"],
                        monkeypatch, capsys)
    assert code == 0 and len(os.listdir(parts)) > 1
    code, cap = run_cli(["create", "memq", "--from", str(parts), "--json"], monkeypatch, capsys)
    assert code == 0 and json.loads(cap.out.strip().splitlines()[-1])["name"] == "memq:latest"

    model, tok = read_gguf(out)
    engine = Engine(model, tok, max_context=64, max_batch=2)
    prompt = tok.encode("hello", add_bos=True)
    done = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert done.token_ids == model.generate(torch.tensor([prompt]), 8)[0, len(prompt):].tolist()

    code, cap = run_cli(["export", "mem", str(tmp_path / "k.gguf"), "--type", "q4_k_m"], monkeypatch, capsys)
    assert code == 0 and gf.GGUFModelFile(str(tmp_path / "k.gguf")).get("general.file_type") == 15


def test_bad_gguf_adds_nothing_to_the_store(good_file, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSEEK_HOME", str(tmp_path / "home"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(open(good_file, "rb").read()[:-1000])
    with pytest.raises(SystemExit, match="bad.gguf"):
        main(["create", "bad", "--from", str(bad)])
    store = Store()
    assert store.list() == [] and not store.exists("bad")
    assert [f for f in os.listdir(store.models_dir) if f.startswith(".tmp")] == []
    with pytest.raises(StoreError):
        store.path_of("bad")


# ------------------------------------------------------------------ against llama.cpp
def llama_logits(llama_cpp, path, prompt, n_new):
    """llama.cpp's greedy continuation of `prompt` and its logits [T, V] over prompt + continuation."""
    llm = llama_cpp.Llama(model_path=path, logits_all=True, n_threads=2, n_ctx=128, verbose=False,
                          type_k=0, type_v=0)  # f32 cache (GGML_TYPE_F32)
    llm.eval(prompt)
    seq = list(prompt)
    for _ in range(n_new):
        seq.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([seq[-1]])
    llm.reset()
    llm.eval(seq)
    logits = torch.tensor(np.array(llm.scores[: len(seq)]))
    llm.close()
    return seq, logits


MEASURED = {}


@pytest.mark.parametrize("qtype,tol", [("f32", 1e-3), ("f16", 2e-3), ("q8_0", 3e-2), ("q4_0", 0.15)])
def test_llama_cpp_runs_our_files(qtype, tol, trained, tok, tmp_path):
    """llama.cpp's deepseek2 and nanoseek on the same file (our model read back from it): the same
    greedy 64 tokens and close logits. llama.cpp multiplies q8_0 / q4_0 weights with activations
    rounded to q8_0 (K-quants with activations rounded to q8_K), hence the larger error there."""
    llama_cpp = pytest.importorskip("llama_cpp")
    (path,) = write_gguf(trained, tok, str(tmp_path / f"m-{qtype}.gguf"), qtype)
    ours, _ = read_gguf(path, dtype=torch.float32)
    prompt = tok.encode("hello world, the quick brown fox", add_bos=True)
    seq, theirs = llama_logits(llama_cpp, path, prompt, 64)
    assert seq == ours.generate(torch.tensor([prompt]), 64)[0].tolist()
    with torch.no_grad():
        logits = ours(torch.tensor([seq]))[0]
    rel = ((theirs - logits).abs().max() / logits.abs().max()).item()
    MEASURED[qtype] = rel
    print(f"llama.cpp vs nanoseek on {qtype}: max relative logit error {rel:.2e}")
    assert rel < tol


@pytest.mark.parametrize("qtype,tol", [("q6_k", 0.05), ("q4_k_m", 0.05)])
def test_llama_cpp_runs_our_k_quant_files(qtype, tol, trained, tok, tmp_path):
    """Our q6_k / q4_k_m exports in llama.cpp and in nanoseek (the model read back from the file):
    the same greedy tokens up to a near tie and close logits. llama.cpp rounds the activations to
    q8_K for the K-quant products; where that error exceeds nanoseek's gap between its two best
    tokens, greedy may part there, and only there: the first differing step must be such a tie."""
    llama_cpp = pytest.importorskip("llama_cpp")
    (path,) = write_gguf(trained, tok, str(tmp_path / f"m-{qtype}.gguf"), qtype)
    ours, _ = read_gguf(path, dtype=torch.float32)
    prompt = tok.encode("hello world, the quick brown fox", add_bos=True)
    seq, theirs = llama_logits(llama_cpp, path, prompt, 64)
    mine = ours.generate(torch.tensor([prompt]), 64)[0].tolist()
    with torch.no_grad():
        logits = ours(torch.tensor([seq]))[0]  # [T, V] on llama.cpp's tokens
    rel = ((theirs - logits).abs().max() / logits.abs().max()).item()
    print(f"llama.cpp vs nanoseek on {qtype}: max relative logit error {rel:.2e}")
    assert rel < tol
    parted = next((i for i in range(len(prompt), len(seq)) if seq[i] != mine[i]), None)
    if parted is not None:
        best2 = logits[parted - 1].topk(2).values
        err = (theirs[parted - 1] - logits[parted - 1]).abs().max()
        print(f"{qtype}: greedy parts at step {parted - len(prompt)}, top-2 gap {best2[0] - best2[1]:.3f}, error {err:.3f}")
        assert best2[0] - best2[1] <= 2 * err
        assert seq[:parted] == mine[:parted]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_llama_cpp_runs_config_variants(variant, tok, tmp_path):
    """Each shape and routing the export accepts computes in llama.cpp what it computes here (f32)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = tiny(seed=2, initializer_range=0.2, **VARIANTS[variant])
    (path,) = write_gguf(model, tok, str(tmp_path / "v.gguf"), "f32")
    prompt = tok.encode("hello world", add_bos=True)
    seq, theirs = llama_logits(llama_cpp, path, prompt, 16)
    with torch.no_grad():
        logits = model(torch.tensor([seq]))[0]
    assert ((theirs - logits).abs().max() / logits.abs().max()).item() < 1e-4
    assert seq == model.generate(torch.tensor([prompt]), 16)[0].tolist()


@pytest.mark.parametrize("pre", ["gpt-2", "deepseek-v3"])
def test_llama_cpp_tokenizes_like_us(pre, tok, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    t = tok if pre == "gpt-2" else ds3_pre_tokenizer(tok)
    (path,) = write_gguf(tiny(), t, str(tmp_path / "t.gguf"), "f32")
    llm = llama_cpp.Llama(model_path=path, n_threads=2, n_ctx=64, verbose=False, vocab_only=True)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == t.encode(text)
    llm.close()


@pytest.mark.parametrize("ftype,name,bound", [(15, "q4_k_m", 0.1), (18, "q6_k", 0.03)])
def test_llama_cpp_k_quants_are_read(ftype, name, bound, tok, tmp_path):
    """llama.cpp's own quantizer turns our f32 file into Q4_K_M / Q6_K (with its fallbacks for short
    rows); nanoseek reads every weight back within the format's rounding of the original."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = tiny(seed=3, hidden_size=256, intermediate_size=256, moe_intermediate_size=256, q_lora_rank=256,
                 kv_lora_rank=256, v_head_dim=256)
    (src,) = write_gguf(model, tok, str(tmp_path / "f32.gguf"), "f32")
    out = str(tmp_path / f"{name}.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, 2
    assert llama_cpp.llama_model_quantize(src.encode(), out.encode(), params) == 0
    types = {t.tensor_type for _, t in gf.GGUFModelFile(out).tensors.values()}
    assert {gf.Q.Q4_K if name == "q4_k_m" else gf.Q.Q6_K} <= types
    back, _ = read_gguf(out, dtype=torch.float32)
    written = model.state_dict()
    for key, got in back.state_dict().items():
        assert (got - written[key]).abs().max() <= bound * written[key].abs().max() + 1e-12, key


def converter(tmp_path):
    """llama.cpp's convert_hf_to_gguf.py (with its gguf-py) extracted from the sdist named by the env var."""
    sdist = os.environ.get(SDIST_ENV)
    if not sdist or not os.path.isfile(sdist):
        pytest.skip(f"set {SDIST_ENV} to llama-cpp-python's sdist to run llama.cpp's converter")
    root = tmp_path / "llama.cpp"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if "/vendor/llama.cpp/" in m.name
                   and m.name.split("/vendor/llama.cpp/", 1)[1].split("/")[0] in ("convert_hf_to_gguf.py", "conversion", "gguf-py")]
        for m in members:
            m.name = m.name.split("/vendor/llama.cpp/", 1)[1]
        tar.extractall(root, members=members, filter="data")
    return root


@pytest.mark.parametrize("source,outtype,tol", [("fixture", "f32", 1e-4), ("fixture", "f16", 2e-3),
                                               ("yarn", "f32", 1e-4)])
def test_llama_cpp_converter_files_load_with_the_checkpoints_logits(source, outtype, tol, trained, tok, tmp_path):
    """llama.cpp's converter on our HF checkpoint; nanoseek reads its GGUF, and our own export of the
    same checkpoint carries the same metadata. The converter names pre-tokenizers by hashing known
    tokenizers' output and does not know ours, which is GPT-2's byte-level regex: the run tells it 'gpt-2'."""
    pytest.importorskip("llama_cpp")
    root = converter(tmp_path)
    checkpoint = FIXTURE
    if source == "yarn":
        checkpoint = str(tmp_path / "yarn")
        trained.save_pretrained(checkpoint)
        tok.save(checkpoint)
    out = tmp_path / f"conv-{outtype}.gguf"
    script = ("import sys; sys.path.insert(0, '.'); import conversion.base as b; "
              "b.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'; "
              "import convert_hf_to_gguf as c; sys.argv = ['convert_hf_to_gguf.py'] + sys.argv[1:]; c.main()")
    p = subprocess.run([sys.executable, "-c", script, checkpoint, "--outfile", str(out), "--outtype", outtype],
                       cwd=root, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    model, tok2 = read_gguf(str(out), dtype=torch.float32)
    ref = DeepSeekV3.from_pretrained(checkpoint, dtype=torch.float32)
    ids = ids_of(tok2)
    with torch.no_grad():
        want, got = ref(ids), model(ids)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    print(f"llama.cpp converter {outtype} of the {source} checkpoint read by nanoseek: max relative logit error {rel:.2e}")
    assert rel <= tol
    assert tok2.encode("the quick brown fox") == tok.encode("the quick brown fox")

    (ours,) = write_gguf(ref, Tokenizer.from_dir(checkpoint), str(tmp_path / "ours.gguf"), outtype)
    theirs, mine = gf.GGUFModelFile(str(out)), gf.GGUFModelFile(ours)
    own = ("general.name", "general.size_label", "general.type", "tokenizer.chat_template", "tokenizer.ggml.add_sep_token")
    keys = {k for k in set(theirs.fields) | set(mine.fields) if not k.startswith("GGUF.") and k not in own}
    assert {k: mine.get(k) for k in keys} == {k: theirs.get(k) for k in keys}
    assert {n: (t.tensor_type, t.shape.tolist()) for n, (_, t) in mine.tensors.items()} == \
           {n: (t.tensor_type, t.shape.tolist()) for n, (_, t) in theirs.tensors.items()}


K_QUANT_SHAPES = [dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=256, q_lora_rank=256,
                       kv_lora_rank=256, v_head_dim=256),  # 8 experts: llama.cpp's Mixtral rules
                  dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=256, q_lora_rank=256,
                       kv_lora_rank=256, v_head_dim=256, n_routed_experts=6, n_group=3, num_hidden_layers=9)]


@pytest.mark.parametrize("shape", range(len(K_QUANT_SHAPES)))
@pytest.mark.parametrize("ftype,mix", [(15, "q4_k_m"), (18, "q6_k"), (2, "q4_0"), (7, "q8_0")])
def test_mix_types_are_llama_cpps(ftype, mix, shape, tok, tmp_path):
    """Our export under each mix gives every tensor the type llama.cpp's quantizer gives it on our f32
    file (and the same general.file_type), except q5_k, which nanoseek lacks: q6_k stands in."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = tiny(seed=3, **K_QUANT_SHAPES[shape])
    (src,) = write_gguf(model, tok, str(tmp_path / "f32.gguf"), "f32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, 2
    assert llama_cpp.llama_model_quantize(src.encode(), str(tmp_path / "theirs.gguf").encode(), params) == 0
    (ours,) = write_gguf(model, tok, str(tmp_path / "ours.gguf"), mix)
    a, b = gf.GGUFModelFile(ours), gf.GGUFModelFile(str(tmp_path / "theirs.gguf"))
    theirs = {n: t.tensor_type for n, (_, t) in b.tensors.items()}
    got = {n: t.tensor_type for n, (_, t) in a.tensors.items()}
    assert got.keys() == theirs.keys()
    for n, q in theirs.items():
        assert got[n] == (gf.Q.Q6_K if q == gf.Q.Q5_K else q), n
    assert a.get("general.file_type") == b.get("general.file_type") == ftype


# ------------------------------------------------------------------ quantized import
@pytest.mark.parametrize("qtype", ["q4_k_m", "q6_k", "q8_0", "f16"])
def test_quantized_import_computes_the_dequantized_model(qtype, trained, tok, tmp_path):
    """read_gguf(quantized=True) holds the file's bytes (QuantLinear / QuantExperts / QuantEmbedding)
    and computes exactly what the dequantized float32 import computes: logits and engine greedy."""
    from nanoseek.quant.qlinear import QuantExperts, QuantLinear, model_bytes
    (path,) = write_gguf(trained, tok, str(tmp_path / f"m-{qtype}.gguf"), qtype)
    exact, _ = read_gguf(path, dtype=torch.float32)
    held, _ = read_gguf(path, dtype=torch.float32, quantized=True)
    assert isinstance(held.lm_head, QuantLinear) and any(isinstance(m, QuantExperts) for m in held.modules())
    assert not any(p.dtype == torch.float32 and p.dim() >= 2 and not name.endswith(("kv_b_proj.weight", "gate.weight"))
                   for name, p in held.named_parameters())
    assert model_bytes(held)["total"] < os.path.getsize(path)
    ids = ids_of(tok)
    with torch.no_grad():
        assert torch.equal(held(ids), exact(ids))
    prompt = tok.encode("hello world, the quick brown fox", add_bos=True)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    got = Engine(held, tok, max_context=64, max_batch=2).generate([prompt], params)[0].token_ids
    assert got == exact.generate(torch.tensor([prompt]), 24)[0, len(prompt):].tolist()


def test_quantized_import_greedy_is_llama_cpps(trained, tok, tmp_path):
    """The quantized import's engine greedy == nanoseek's dequantized model == llama.cpp's, on q8_0."""
    llama_cpp = pytest.importorskip("llama_cpp")
    (path,) = write_gguf(trained, tok, str(tmp_path / "m.gguf"), "q8_0")
    held, _ = read_gguf(path, dtype=torch.float32, quantized=True)
    prompt = tok.encode("hello world, the quick brown fox", add_bos=True)
    seq, _ = llama_logits(llama_cpp, path, prompt, 64)
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    assert prompt + Engine(held, tok, max_context=128, max_batch=2).generate([prompt], params)[0].token_ids == seq


RSS_PROBE = """
import os, sys, torch
from nanoseek.gguf_file import read_gguf
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
def run(model, tok):
    with torch.no_grad():
        model(torch.tensor([tok.encode("hello world", add_bos=True)]))
run(*read_gguf(sys.argv[2], dtype=torch.float32, quantized=True))  # a tiny file first: imports and kernels warm
before = rss()
model, tok = read_gguf(sys.argv[1], dtype=torch.float32, quantized=True)
loaded = rss()
for _ in range(3):
    run(model, tok)
print(loaded - before, rss() - before)
"""


def test_quantized_import_resident_memory_is_the_files(tok, tmp_path):
    """Loading a q4_k_m `nano` model quantized (and running it once) adds about the file's size to
    the resident memory, not a float copy of the model (bf16 would add ~3x the file, float32 ~6x);
    the constant covers the float parts (norms, router, kv_b_proj). Measured after loading; a
    forward adds its activations and one dequantized weight at a time (printed, not held)."""
    from nanoseek import ModelConfig
    cfg = ModelConfig.from_preset("nano", num_nextn_predict_layers=0)
    model = DeepSeekV3.from_config(cfg, dtype=torch.float32, seed=0)
    (path,) = write_gguf(model, tok, str(tmp_path / "nano.gguf"), "q4_k_m")
    size = os.path.getsize(path)
    (warm,) = write_gguf(tiny(), tok, str(tmp_path / "tiny.gguf"), "q4_k_m")
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, path, warm], capture_output=True, text=True, check=True)
    grown, ran = map(int, out.stdout.strip().splitlines()[-1].split())
    floats = sum(p.numel() for p in model.parameters()) * 4
    print(f"q4_k_m nano: file {size / 2**20:.2f} MiB, resident growth {grown / 2**20:.2f} MiB after loading, "
          f"{ran / 2**20:.2f} MiB after 3 forwards (one layer dequantized at a time), float32 model {floats / 2**20:.2f} MiB")
    assert grown <= 1.1 * size + 4 * 2**20


def test_create_from_gguf_keeps_the_file_quantized(trained, tok, tmp_path, monkeypatch, capsys):
    """`create --from FILE.gguf` stores the file itself (no safetensors); load_model, the engine and
    `chat` run it quantized, with the dequantized model's greedy tokens; `show` prints its types."""
    from nanoseek.load import load_model
    from nanoseek.quant.qlinear import QuantLinear, model_bytes
    monkeypatch.setenv("NANOSEEK_HOME", str(tmp_path / "home"))
    (path,) = write_gguf(trained, tok, str(tmp_path / "m.gguf"), "q4_k_m")
    assert run_cli(["create", "memk", "--from", path], monkeypatch, capsys)[0] == 0
    entry = Store().path_of("memk")
    files = os.listdir(entry)
    assert "m.gguf" in files and not any(f.endswith(".safetensors") for f in files)
    assert open(os.path.join(entry, "m.gguf"), "rb").read() == open(path, "rb").read()
    assert Store().manifest("memk")["quantization"] == "Q4_K_M"
    model = load_model(entry, dtype=torch.float32)
    assert isinstance(model.lm_head, QuantLinear)
    exact, _ = read_gguf(path, dtype=torch.float32)
    prompt = tok.encode("hello world", add_bos=True)
    got = Engine(model, Tokenizer.from_dir(entry), max_context=64, max_batch=2).generate(
        [prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0].token_ids
    assert got == exact.generate(torch.tensor([prompt]), 12)[0, len(prompt):].tolist()
    code, cap = run_cli(["show", "memk"], monkeypatch, capsys)
    # the fixture's 64-wide rows take llama.cpp's fallbacks (q5_0 for q4_k, q8_0 for q6_k)
    assert code == 0 and "Q4_K_M" in cap.out and "q5_0" in cap.out and "GGUF bytes" in cap.out
    shown = Store().show("memk")["gguf_tensors"]
    held = model_bytes(model)
    f = gf.GGUFModelFile(path)  # every quantized tensor is held as is, but attn_k_b / attn_v_b (float kv_b_proj)
    kv_b = {}
    for n, (_, t) in f.tensors.items():
        if n.endswith(("attn_k_b.weight", "attn_v_b.weight")):
            kv_b[t.tensor_type.name.lower()] = kv_b.get(t.tensor_type.name.lower(), 0) + int(t.n_bytes)
    for kind in ("q5_0", "q8_0"):
        assert held[kind] + kv_b.get(kind, 0) == shown[kind]["bytes"], kind
    chat = run_cli(["chat", "memk", "--max-tokens", "8", "--temperature", "0"], monkeypatch, capsys,
                   stdin="What is the capital of France?\n")
    assert chat[0] == 0 and chat[1].out.strip()
    assert run_cli(["create", "memf", "--from", path, "--dtype", "float32"], monkeypatch, capsys)[0] == 0
    assert any(f.endswith(".safetensors") for f in os.listdir(Store().path_of("memf")))
