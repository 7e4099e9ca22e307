"""The local model store: create / list / show / rm, name validation, atomic create; the CLI verbs."""

import json
import os
import subprocess
import sys

import pytest

from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.infer.store import InvalidName, ModelNotFound, Store, StoreError, canonical_name, parse_name
from nanoseek.tokenizer import train_bpe

CORPUS = ["What is two plus two? Two plus two is four. " * 4, "the quick brown fox jumps over the lazy dog. " * 4,
          "hello world, hello there. " * 4]


def tiny_config(vocab_size=512, **kw):
    return ModelConfig.from_preset(
        "nano", vocab_size=vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
        num_nextn_predict_layers=0, **kw)


def make_checkpoint(directory, model=None, tokenizer=None):
    """A tiny model + byte-level BPE tokenizer saved as a Hugging Face checkpoint directory."""
    tokenizer = tokenizer or train_bpe(CORPUS, 512)
    model = model or DeepSeekV3.from_config(tiny_config(), seed=0)
    model.save_pretrained(str(directory))
    tokenizer.save(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_create_list_show_rm(tmp_path, ckpt):
    store = Store(str(tmp_path / "home"))
    assert store.list() == []
    m = store.create("tiny", ckpt)
    assert m["name"] == "tiny:latest" and len(m["digest"]) == 64 and m["size"] > 0
    assert m["parameters"] == tiny_config().param_counts()["total_params"]
    path = store.path_of("tiny")
    assert path == store.path_of("tiny:latest") == os.path.join(store.models_dir, "tiny", "latest")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(path))
    # the stored copy loads
    DeepSeekV3.from_pretrained(path)
    store.create("tiny:v2", ckpt)
    names = [x["name"] for x in store.list()]
    assert sorted(names) == ["tiny:latest", "tiny:v2"]
    assert store.list()[0]["digest"] == m["digest"]  # same files, same digest
    s = store.show("tiny")
    assert s["architecture"] == "deepseek_v3" and s["context_length"] == 1024 and s["quantization"] == "F32"
    assert s["template_source"] == "built-in" and s["thinking"] is True
    assert s["kv_lora_rank"] == 32 and s["layers"] == 2
    with pytest.raises(StoreError, match="already exists"):
        store.create("tiny", ckpt)
    store.create("tiny", ckpt, force=True)  # replace in place
    assert store.rm("tiny") == "tiny:latest"
    with pytest.raises(ModelNotFound, match="model 'tiny' not found"):
        store.path_of("tiny")
    assert [x["name"] for x in store.list()] == ["tiny:v2"]
    store.rm("tiny:v2")
    assert store.list() == [] and os.listdir(store.models_dir) == []  # no leftovers, not even temp dirs


@pytest.mark.parametrize("name", [
    "../evil", "..", "a/../../b", "/etc/passwd", "a/b", "a\\b", "x:..", "x:../y", ".hidden", "-dash", "",
    "a:b:c", "a:", ":tag", "a" * 65, "a\0b", "sp ace", "ünïcode", "~root", "$HOME", "a..b", "tiny:la/test",
])
def test_name_validation_rejects(tmp_path, ckpt, name):
    store = Store(str(tmp_path / "home"))
    with pytest.raises(InvalidName):
        parse_name(name)
    with pytest.raises(InvalidName):
        store.create(name, ckpt)
    with pytest.raises(InvalidName):
        store.path_of(name)
    with pytest.raises(InvalidName):
        store.rm(name)
    # nothing was written anywhere near the store
    assert not os.path.exists(tmp_path / "evil") and not os.path.exists(tmp_path / "b")
    assert not os.path.isdir(store.models_dir) or os.listdir(store.models_dir) == []


@pytest.mark.parametrize("name,canon", [("tiny", "tiny:latest"), ("Deep-Seek_R1.5:7b-q8", "Deep-Seek_R1.5:7b-q8"),
                                        ("a" * 64 + ":" + "b" * 64, "a" * 64 + ":" + "b" * 64)])
def test_name_validation_accepts(name, canon):
    assert canonical_name(name) == canon


def test_create_validates_the_source(tmp_path, ckpt):
    import shutil
    store = Store(str(tmp_path / "home"))
    with pytest.raises(StoreError, match="not a directory"):
        store.create("x", str(tmp_path / "missing"))
    bad = tmp_path / "no_tok"
    shutil.copytree(ckpt, bad)
    os.unlink(bad / "tokenizer.json")
    with pytest.raises(StoreError, match="tokenizer.json: no such file"):
        store.create("x", str(bad))
    bad = tmp_path / "no_cfg"
    shutil.copytree(ckpt, bad)
    os.unlink(bad / "config.json")
    with pytest.raises(StoreError, match="config.json: no such file"):
        store.create("x", str(bad))
    bad = tmp_path / "no_weights"
    shutil.copytree(ckpt, bad)
    os.unlink(bad / "model.safetensors")
    with pytest.raises(StoreError, match="model.safetensors"):
        store.create("x", str(bad))
    bad = tmp_path / "truncated"
    shutil.copytree(ckpt, bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(StoreError, match="corrupt or truncated"):
        store.create("x", str(bad))
    bad = tmp_path / "wrong_shape"
    make_checkpoint(bad, model=DeepSeekV3.from_config(tiny_config(), seed=0))
    cfg = json.loads((bad / "config.json").read_text())
    cfg["hidden_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StoreError, match="shape"):
        store.create("x", str(bad))
    bad = tmp_path / "small_vocab"
    make_checkpoint(bad, model=DeepSeekV3.from_config(tiny_config(vocab_size=300), seed=0))
    with pytest.raises(StoreError, match="vocab_size 300"):
        store.create("x", str(bad))
    assert store.list() == []
    assert not os.path.isdir(store.models_dir) or os.listdir(store.models_dir) == []


def test_failed_create_leaves_nothing(tmp_path, ckpt, monkeypatch):
    """A failure half-way through the copy (disk full, crash) leaves no model and no temp folder."""
    import nanoseek.infer.store as store_mod
    store = Store(str(tmp_path / "home"))
    store.create("keep", ckpt)
    calls = []
    real = store_mod._sha256_copy

    def failing_copy(src, dst):
        calls.append(src)
        if len(calls) == 2:
            real(src, dst)
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(store_mod, "_sha256_copy", failing_copy)
    with pytest.raises(OSError, match="No space left"):
        store.create("tiny", ckpt)
    assert sorted(os.listdir(store.models_dir)) == ["keep"]
    assert [m["name"] for m in store.list()] == ["keep:latest"]
    # a forced replace that fails keeps the old model intact
    calls.clear()
    with pytest.raises(OSError):
        store.create("keep", ckpt, force=True)
    assert sorted(os.listdir(store.models_dir)) == ["keep"]
    DeepSeekV3.from_pretrained(store.path_of("keep"))
    # a folder without a manifest (e.g. a crash during a manual copy) is not a model
    os.makedirs(os.path.join(store.models_dir, "ghost", "latest"))
    assert [m["name"] for m in store.list()] == ["keep:latest"]
    with pytest.raises(ModelNotFound):
        store.path_of("ghost")


def test_cli_create_list_show_rm(tmp_path, ckpt, monkeypatch, capsys):
    from nanoseek.cli import main
    home = str(tmp_path / "home")
    env = {**os.environ, "NANOSEEK_HOME": home}
    # the real entry point once (a subprocess), the other verbs in-process (no torch import each time)
    p = subprocess.run([sys.executable, "-m", "nanoseek", "create", "tiny", "--from", ckpt, "--json"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["name"] == "tiny:latest"
    monkeypatch.setenv("NANOSEEK_HOME", home)

    def run(*args):
        capsys.readouterr()
        assert main(list(args)) == 0
        return capsys.readouterr().out

    listing = run("list").splitlines()
    assert listing[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert listing[1].startswith("tiny:latest") and out["digest"][:12] in listing[1]
    shown = run("show", "tiny")
    assert "deepseek_v3" in shown and "context length" in shown and "F32" in shown
    with pytest.raises(SystemExit, match="invalid model name"):
        main(["create", "../escape", "--from", ckpt])
    assert not (tmp_path / "escape").exists()
    with pytest.raises(SystemExit, match="model 'nope' not found"):
        main(["show", "nope"])
    assert "deleted 'tiny:latest'" in run("rm", "tiny")
    assert run("ls", "--json").strip().splitlines()[-1] == '{"models": []}'
