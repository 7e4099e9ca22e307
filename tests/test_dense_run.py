"""Dense R1-distill models through the store and the commands: a tiny random Qwen2 checkpoint with
an R1-distill-style tokenizer (Qwen2 / Llama-3 pre-tokenizer regex, byte-level BPE, `<think>` and
`</think>` as added tokens) and chat template (the generation prompt ends with `<think>\\n`) is
created in a store; `nanoseek show` prints its GQA shape, `nanoseek generate` and the OpenAI client
against `nanoseek serve` return the model's own greedy continuation, split into reasoning and answer
where the model emits `</think>`. Dense students fine-tune (`nanoseek sft`, full and LoRA on q/k/v/o
and gate/up/down), and R1's distillation recipe runs end to end: a DeepSeek-V3-architecture teacher
distilled into a Qwen2-architecture student raises its task accuracy."""

import json
import threading

import ollama
import openai
import pytest
import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as TokenizersTokenizer

from nanoseek import load_model
from nanoseek.infer.chat import render_chat, split_thinking
from nanoseek.cli import main
from nanoseek.dense import DenseModel
from nanoseek.dense_config import DenseConfig
from nanoseek.serve.app import make_server
from nanoseek.infer.store import Store
from nanoseek.tokenizer import Tokenizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
SPECIAL = [BOS, EOS, "<｜User｜>", "<｜Assistant｜>"]
# the pre-tokenizer regexes of Qwen2's and Llama 3's tokenizer.json
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek-R1-Distill-Qwen's chat template, without its tool-call branches
R1_DISTILL_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- endfor -%}"
    "{% if add_generation_prompt %}{{'<｜Assistant｜><think>\\n'}}{% endif %}")
CORPUS = "Why is the sky blue? Light scatters off the air, and blue light scatters most. " * 8
QUESTION = "Why is the sky blue?"
NEW_TOKENS = 24


def write_hf_tokenizer(directory, pattern=QWEN2_PATTERN, vocab_size=300) -> None:
    """tokenizer.json + tokenizer_config.json as the R1-distill checkpoints ship them: a byte-level
    BPE behind the family's split regex, DeepSeek's BOS/EOS as special tokens, <think> / </think>
    as plain added tokens, special tokens in the config as AddedToken objects. The BPE's alphabet is
    printable ASCII, space and newline, so every token decodes to whole characters."""
    tk = TokenizersTokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    ascii_symbols = [chr(b) for b in range(33, 127)] + ["Ġ", "Ċ"]  # byte-level spellings of ASCII, space, \n
    tk.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                                         initial_alphabet=ascii_symbols, min_frequency=0,
                                                         show_progress=False))
    tk.add_tokens([AddedToken("<think>", special=False, normalized=False),
                   AddedToken("</think>", special=False, normalized=False)])
    tk.save(str(directory / "tokenizer.json"))

    def added(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}

    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": added(BOS), "eos_token": added(EOS),
              "pad_token": added(EOS), "clean_up_tokenization_spaces": False, "legacy": True,
              "model_max_length": 16384, "sp_model_kwargs": {}, "unk_token": None,
              "tokenizer_class": "LlamaTokenizerFast", "chat_template": R1_DISTILL_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def greedy_reply(model, tok, prompt_ids, n=NEW_TOKENS) -> list[int]:
    """The model's own greedy continuation, up to (not including) EOS."""
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, eos_token_id=tok.eos_id)[0, len(prompt_ids):]
    out = out.tolist()
    return out[:out.index(tok.eos_id)] if tok.eos_id in out else out


@pytest.mark.parametrize("pattern", [QWEN2_PATTERN, LLAMA3_PATTERN], ids=["qwen2", "llama3"])
def test_tokenizer_from_dir_reads_hf_style_files(tmp_path, pattern):
    write_hf_tokenizer(tmp_path, pattern)
    tok = Tokenizer.from_dir(str(tmp_path))
    assert tok.bos_token == BOS and tok.eos_token == EOS and tok.chat_template == R1_DISTILL_TEMPLATE
    assert tok.token_to_id("<think>") is not None and tok.token_to_id("</think>") is not None
    text = f"{BOS}<｜User｜>{QUESTION}<｜Assistant｜><think>\nblue light</think>It scatters."
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.token_to_id("</think>") in ids
    assert tok.decode(ids) == text


@pytest.fixture(scope="module")
def r1_checkpoint(tmp_path_factory):
    """(folder, model, tokenizer, prompt ids, greedy reply ids) of a tiny random Qwen2 R1-distill-
    style checkpoint whose greedy reply to QUESTION closes its think block part-way."""
    path = tmp_path_factory.mktemp("r1-qwen2")
    write_hf_tokenizer(path)
    tok = Tokenizer.from_dir(str(path))
    cfg = DenseConfig(model_type="qwen2", vocab_size=320, hidden_size=64, intermediate_size=112,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=512, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                      torch_dtype="float32")
    model = DenseModel.from_config(cfg, seed=0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)  # sharper logits than the init's, so greedy choices are not near-ties
    prompt = render_chat(tok, [{"role": "user", "content": QUESTION}])
    assert prompt.endswith("<｜Assistant｜><think>\n")  # the template opens the think block itself
    ids = tok.encode(prompt)
    close = tok.token_to_id("</think>")
    first = greedy_reply(model, tok, ids)
    assert len(first) > 8, "the random model ended its reply at once: pick another seed"
    with torch.no_grad():  # swap two rows of the head, so the model says </think> where it said first[4]
        head = model.lm_head.weight
        head[[first[4], close]] = head[[close, first[4]]]
    reply = greedy_reply(model, tok, ids)
    assert close in reply and 0 < reply.index(close) < len(reply) - 1, reply
    model.save_pretrained(str(path))
    return str(path), model, tok, ids, reply


@pytest.fixture(scope="module")
def store(tmp_path_factory, r1_checkpoint):
    store = Store(str(tmp_path_factory.mktemp("home")))
    store.create("r1-qwen", r1_checkpoint[0])
    return store


def expected_split(tok, reply):
    """(reasoning, answer) of the reply the prompt opened inside <think>."""
    return split_thinking(tok.decode(reply), opened=True)


def test_store_create_and_show(store, r1_checkpoint, capsys, monkeypatch):
    path, model, *_ = r1_checkpoint
    m = store.manifest("r1-qwen")
    assert m["architecture"] == "qwen2" and m["parameters"] == model.num_params() == m["active_parameters"] + \
        model.config.vocab_size * model.config.hidden_size and m["mtp_parameters"] == 0
    s = store.show("r1-qwen")
    assert s["architecture"] == "qwen2" and s["dense"] and s["context_length"] == 512
    assert (s["kv_heads"], s["head_dim"], s["kv_cache_values"], s["attention_heads"]) == (2, 16, 64, 4)
    assert s["template_source"] == "tokenizer_config.json" and s["thinking"] is True
    assert type(load_model(store.path_of("r1-qwen"))) is DenseModel
    monkeypatch.setenv("NANOSEEK_HOME", store.root)
    assert main(["show", "r1-qwen"]) == 0
    out = capsys.readouterr().out
    assert "architecture        qwen2" in out and "context length      512" in out
    assert "GQA, 4 query heads, 2 K/V heads, head_dim 16" in out and "64 values / token / layer" in out
    assert main(["show", "r1-qwen", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kv_heads"] == 2
    assert main(["create", "r1-cli", "--from", path, "--json"]) == 0
    created = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert created["architecture"] == "qwen2" and created["parameters"] == model.num_params()
    assert main(["info", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["model_type"] == "qwen2" and info["total_params"] == model.num_params()
    assert info["gqa_kv_bytes_per_token"] == 64 * 2 * 2


def test_generate_returns_the_greedy_reply_split(store, r1_checkpoint, capsys, monkeypatch):
    _, _, tok, _, reply = r1_checkpoint
    monkeypatch.setenv("NANOSEEK_HOME", store.root)
    assert main(["generate", "r1-qwen", QUESTION, "--temperature", "0", "--max-tokens", str(NEW_TOKENS),
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    thinking, answer = expected_split(tok, reply)
    assert thinking and answer
    assert (r["thinking"], r["response"]) == (thinking, answer) and r["eval_count"] == len(reply)


def test_openai_client_against_serve(store, r1_checkpoint):
    _, _, tok, ids, reply = r1_checkpoint
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    server = make_server("127.0.0.1", 0, store=store, context_length=256)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        oa = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused",
                           max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": QUESTION}]
        r = oa.chat.completions.create(model="r1-qwen", messages=msgs, temperature=0, max_tokens=NEW_TOKENS)
        thinking, answer = expected_split(tok, reply)
        c = r.choices[0]
        assert (c.message.reasoning_content, c.message.content) == (thinking, answer)
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(reply)
        chunks = [ch for ch in oa.chat.completions.create(model="r1-qwen", messages=msgs, temperature=0,
                                                          max_tokens=NEW_TOKENS, stream=True) if ch.choices]
        assert "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks) == thinking
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == answer
        # the raw completion of the rendered prompt is the model's own continuation, unsplit
        prompt = render_chat(tok, msgs)
        r = oa.completions.create(model="r1-qwen", prompt=prompt, temperature=0, max_tokens=NEW_TOKENS)
        assert r.choices[0].text == tok.decode(reply)
        # the Ollama API splits the same way
        ol = ollama.Client(host=f"http://127.0.0.1:{server.server_address[1]}", timeout=60)
        r = ol.chat(model="r1-qwen", messages=msgs, options={"temperature": 0, "num_predict": NEW_TOKENS})
        assert (r.message.thinking, r.message.content) == (thinking, answer)
        # /api/show reports the real architecture and its grouped-query attention, not MLA keys
        shown = ol.show("r1-qwen")
        assert shown.details.family == "qwen2" and shown.modelinfo["general.architecture"] == "qwen2"
        assert shown.modelinfo["qwen2.attention.head_count_kv"] == 2  # the r1_checkpoint fixture's K/V heads
        assert shown.modelinfo["qwen2.attention.head_count"] == 4
        assert not any("kv_lora_rank" in k or "expert" in k for k in shown.modelinfo)
    finally:
        server.shutdown_all()
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ fine-tuning and distillation
def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def save_qwen2_student(path, tok, seed=1) -> str:
    """A tiny random Qwen2-architecture student (q/k/v biases, tied embeddings) with `tok` beside it."""
    cfg = DenseConfig(model_type="qwen2", vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=tok.bos_id,
                      eos_token_id=tok.eos_id, torch_dtype="float32")
    DenseModel.from_config(cfg, seed=seed).save_pretrained(str(path))
    tok.save(str(path))
    return str(path)


SHIFT = "abcdefgh"
SHIFT_PROMPTS = ["shift " + " ".join(c) for c in ([a, b, c] for a in SHIFT for b in SHIFT[::3] for c in SHIFT[::2])]


def test_lora_targets_the_dense_projections():
    from nanoseek.finetune.lora import apply_lora, merge_lora
    cfg = DenseConfig(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, torch_dtype="float32")
    model = DenseModel.from_config(cfg, seed=0)
    names = apply_lora(model, 2)
    want = {f"model.layers.{i}.{m}.{p}.weight" for i in range(2) for m, ps in
            (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
            for p in ps}
    assert set(names) == want
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_()
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
        adapted = model(ids)
        merged = merge_lora(model)(ids)
    assert (adapted - merged).abs().max().item() <= 1e-5


@pytest.mark.parametrize("lora", [None, 4], ids=["full", "lora"])
def test_sft_fine_tunes_a_dense_student(tmp_path, lora):
    from fixtures.make_fixtures import SHIFT_TEACHER

    from nanoseek.finetune.sft import SFTOptions, run_sft
    from nanoseek.train import TrainArgs
    tok = Tokenizer.from_dir(SHIFT_TEACHER)
    student = save_qwen2_student(tmp_path / "student", tok)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": "<think>a b</think>b c"}
                                              for p in SHIFT_PROMPTS])
    s = run_sft(TrainArgs(data=[data], model=student, out=str(tmp_path / "out"), max_steps=12, batch_size=8,
                          seq_len=64, progress=False, eval_every=1000), SFTOptions(lora=lora))
    assert s["sft"]["mode"] == ("full" if lora is None else f"lora-{lora}") and s["step"] == 12
    assert s["val_loss"] < s["val_loss_start"]
    tuned = load_model(str(tmp_path / "out"))
    assert type(tuned) is DenseModel and tuned.config.model_type == "qwen2" and tuned.config.tie_word_embeddings
    if lora:
        assert s["sft"]["params_trainable"] < tuned.num_params() // 4


def test_distillation_into_a_qwen2_student_raises_its_accuracy(tmp_path):
    """R1's recipe on tiny models: the DeepSeek-V3-architecture teacher (the fixture, whose greedy
    reply to every "shift x y z" is TEACHER_REPLY) answers the prompts, the verifier keeps the
    correct completions, a Qwen2-architecture student is fine-tuned on them and then answers held-
    out prompts correctly; the control fine-tuned on the gold answers learns the task too."""
    from fixtures.make_fixtures import SHIFT_TEACHER, TEACHER_REPLY

    from nanoseek.finetune.distill import PromptRecord, accuracy, distill, verify_exact
    from nanoseek.finetune.sft import SFTOptions, run_sft
    from nanoseek.train import TrainArgs
    answer = split_thinking(TEACHER_REPLY)[1]
    tok = Tokenizer.from_dir(SHIFT_TEACHER)
    train_prompts, test_prompts = SHIFT_PROMPTS[:48], SHIFT_PROMPTS[48:]
    # half of the prompts carry another gold answer: the teacher fails them and they are not kept
    records = [{"prompt": p, "answer": answer if i % 2 else "c d"} for i, p in enumerate(train_prompts)]
    test = [PromptRecord([{"role": "user", "content": p}], answer, "") for p in test_prompts]
    student = save_qwen2_student(tmp_path / "student", tok)
    common = dict(max_steps=40, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5, progress=False, eval_every=1000)

    def acc(path):
        model = load_model(path)
        assert type(model) is DenseModel
        return accuracy(model, Tokenizer.from_dir(path), test, verify_exact, 24)

    before = acc(student)
    s = distill(SHIFT_TEACHER, student, write_jsonl(tmp_path / "prompts.jsonl", records), str(tmp_path / "distilled"),
                TrainArgs(**common), SFTOptions(), max_new_tokens=24, say=lambda *_: None)
    d = s["distill"]
    assert d["pass_rate"] == 0.5 and d["kept"] == d["passed"] == len(train_prompts) // 2
    control_data = write_jsonl(tmp_path / "gold.jsonl", [{"prompt": r["prompt"], "completion": r["answer"]}
                                                         for r in records if r["answer"] == answer])
    run_sft(TrainArgs(data=[control_data], model=student, out=str(tmp_path / "control"), **common), SFTOptions())
    distilled, control = acc(str(tmp_path / "distilled")), acc(str(tmp_path / "control"))
    print(f"teacher pass rate {d['pass_rate']:.2f}; student accuracy before {before:.2f}, "
          f"distilled {distilled:.2f}, gold-answer control {control:.2f}")
    assert before < 0.05 and distilled > before + 0.5
    assert control > before + 0.5  # the gold-answer control learns the task too: the comparison is fair
