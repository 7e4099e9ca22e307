"""GPU-only contracts (marker `gpu`, skipped without CUDA): the paths the CPU suite cannot run.

- grouped == per-expert: `torch._grouped_mm` experts against the per-expert loop, forward and
  backward, both measured against a float64 reference.
- CUDA-graph decode == eager decode: the engine's replayed graphs give the same greedy tokens and
  log-probs as its eager steps, on the memorizer fixture (whose greedy margins are wide).
- MTP speculative decoding == plain greedy decoding, eager and with the two-token verify step
  replayed from CUDA graphs, on the memorizer with an MTP layer added.
- Triton FP8 kernels == the PyTorch reference: quantizers bit for bit; grouped GEMMs (Fprop/Dgrad
  and the K-grouped Wgrad) on segments of awkward sizes to the same > 50 dB SQNR against the fp32
  emulation that cuBLAS's blockwise `_scaled_mm` must meet (tests/test_fp8.py). Not float32
  summation-order noise: Hopper's FP8 tensor cores add up the products of one 128-wide scale group
  in reduced precision (DeepSeek-V3 section 3.3.2, about 14 bits); the kernels promote to fp32
  after every group, which bounds that error but does not remove it.
"""

import pytest
import torch

from nanoseek import DeepSeekV3
from nanoseek.infer.chat import render_chat
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.model import Experts
from nanoseek.tokenizer import Tokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


# ------------------------------------------------------------------ experts: grouped == per-expert
@pytest.mark.skipif(not (HOPPER and hasattr(torch, "_grouped_mm")), reason="needs torch._grouped_mm on SM90+")
@pytest.mark.parametrize("n_tokens", [1, 37, 2048])
def test_grouped_mm_experts_equal_the_per_expert_loop(n_tokens):
    torch.manual_seed(0)
    E, h, inter, k = 16, 256, 128, 4
    ex = Experts(E, h, inter).cuda()
    for w in (ex.gate_proj, ex.up_proj, ex.down_proj):
        torch.nn.init.normal_(w, std=0.05)
    x = torch.randn(n_tokens, h, device="cuda")
    idx = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(n_tokens)])
    idx[: n_tokens // 2, 0] = 3  # an unbalanced load; some experts get no token at all
    wts = torch.rand(n_tokens, k, device="cuda")

    # float64 reference, one token at a time
    w64 = [w.detach().double() for w in (ex.gate_proj, ex.up_proj, ex.down_proj)]
    x64 = x.double()
    ref = torch.zeros(n_tokens, h, dtype=torch.float64, device="cuda")
    for j in range(k):
        e = idx[:, j]
        hid = torch.nn.functional.silu(torch.einsum("nh,nih->ni", x64, w64[0][e])) * torch.einsum(
            "nh,nih->ni", x64, w64[1][e])
        ref += wts[:, j, None].double() * torch.einsum("ni,nhi->nh", hid, w64[2][e])

    outs, grads = {}, {}
    for impl in ("grouped_mm", "segments"):
        ex.impl = impl
        ex.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = ex(xi, idx, wts)
        y.float().pow(2).sum().backward()
        outs[impl] = y.detach()
        grads[impl] = [xi.grad] + [w.grad.clone() for w in (ex.gate_proj, ex.up_proj, ex.down_proj)]
    err = {impl: _rel(o, ref) for impl, o in outs.items()}
    assert err["segments"] < 2e-2, err  # bf16 GEMMs with fp32 accumulation
    assert err["grouped_mm"] <= 1.5 * err["segments"] + 1e-4, err
    for g_grouped, g_loop in zip(grads["grouped_mm"], grads["segments"]):
        assert _rel(g_grouped, g_loop.double()) < 2e-2


# ------------------------------------------------------------------ engine: graphs == eager
def test_cuda_graph_decode_equals_eager_decode():
    from fixtures.make_fixtures import MEMORIZER, QUESTION, REPLY
    model = DeepSeekV3.from_pretrained(MEMORIZER, dtype=torch.bfloat16, device="cuda")
    tok = Tokenizer.from_dir(MEMORIZER)
    prompt = tok.encode(render_chat(tok, [{"role": "user", "content": QUESTION}]))
    want = tok.encode(REPLY)
    params = SamplingParams(max_tokens=len(want) + 4, temperature=0.0)
    runs = {}
    for graphs in (False, True):
        eng = Engine(model, tok, max_context=128, max_batch=4, cuda_graphs=graphs)
        # three identical prompts and a shorter one: batch buckets 4, then 1 after the others stop
        prompts = [prompt, prompt, prompt, prompt[-9:]]
        runs[graphs] = eng.generate(prompts, params)
        if graphs:
            assert eng._graphs is not None and eng._graphs.graphs, "the graph path did not run"
        eng.close()
    for eager, graph in zip(runs[False], runs[True]):
        assert graph.token_ids == eager.token_ids
        assert max(abs(a - b) for a, b in zip(graph.logprobs, eager.logprobs)) < 0.05
    assert runs[True][0].token_ids == want and runs[True][0].finish_reason == "stop"  # EOS after the reply


# ------------------------------------------------------------------ engine: speculative == plain
def test_speculative_decode_equals_plain_decode_eager_and_graphed():
    from fixtures.make_fixtures import MEMORIZER, QUESTION, REPLY
    base = DeepSeekV3.from_pretrained(MEMORIZER, dtype=torch.bfloat16, device="cuda")
    model = DeepSeekV3.from_config(base.config.replace(num_nextn_predict_layers=1), device="cuda",
                                   dtype=torch.bfloat16, seed=0)
    model.load_state_dict(base.state_dict(), strict=False)  # the same main model, a random MTP layer
    model.eval()
    tok = Tokenizer.from_dir(MEMORIZER)
    prompt = tok.encode(render_chat(tok, [{"role": "user", "content": QUESTION}]))
    want = tok.encode(REPLY)
    params = SamplingParams(max_tokens=len(want) + 4, temperature=0.0)
    prompts = [prompt, prompt, prompt, prompt[-9:], prompt[-5:]]  # buckets 4, 2, 1 as requests finish
    runs = {}
    for speculative, graphs in ((False, False), (True, False), (True, True)):
        eng = Engine(model, tok, max_context=128, max_batch=4, cuda_graphs=graphs, speculative=speculative)
        runs[speculative, graphs] = eng.generate(prompts, params)
        if graphs:
            assert eng._graphs is not None and eng._graphs.width == 2 and eng._graphs.graphs
        if speculative:
            assert eng.speculative_stats.drafted > 0
        eng.close()
    for key in ((True, False), (True, True)):
        for plain, spec in zip(runs[False, False], runs[key]):
            assert spec.token_ids == plain.token_ids, key
            assert max(abs(a - b) for a, b in zip(spec.logprobs, plain.logprobs)) < 0.05
    assert runs[True, True][0].token_ids == want and runs[True, True][0].finish_reason == "stop"


# ------------------------------------------------------------------ Triton FP8 kernels
def _triton():
    fp8_triton = pytest.importorskip("nanoseek.quant.fp8_triton")
    if torch.cuda.get_device_capability()[0] * 10 + torch.cuda.get_device_capability()[1] < 89:
        pytest.skip("E4M3 needs compute capability 8.9+")
    return fp8_triton


SIZES = [[300], [0, 1, 127, 128, 129, 0, 513], [64] * 16]


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("pow2", [False, True])
def test_triton_quantizers_bit_identical_to_the_reference(sizes, pow2):
    from nanoseek.quant import fp8
    from nanoseek.quant.checked import same_fp8, same_segments
    ft = _triton()
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(sum(sizes), 384, device="cuda", generator=g, dtype=torch.bfloat16) * 3
    x[0, :5] = 0.0  # a zero run inside a tile
    tm = fp8.tile_map(sizes, "cuda")
    got = ft.KERNELS.quantize_act_dual(x, tm, pow2)
    ref = fp8.TORCH_KERNELS.quantize_act_dual(x, tm, pow2)
    assert same_fp8(got[0], ref[0]) and same_segments(got[1], ref[1])
    w = torch.randn(len(sizes), 256, 384, device="cuda", generator=g) * 0.02
    for transposed in (True, False):
        gw = ft.KERNELS.quantize_weight_dual(w, pow2, transposed)
        rw = fp8.TORCH_KERNELS.quantize_weight_dual(w, pow2, transposed)
        assert same_fp8(gw[0], rw[0]) and same_fp8(gw[1], rw[1])


@pytest.mark.parametrize("sizes", SIZES)
def test_triton_grouped_gemms_match_the_reference(sizes):
    from nanoseek.quant import fp8
    ft = _triton()
    g = torch.Generator(device="cuda").manual_seed(2)
    E, N, K = len(sizes), 256, 384
    x = torch.randn(sum(sizes), K, device="cuda", generator=g, dtype=torch.bfloat16)
    dy = torch.randn(sum(sizes), N, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device="cuda", generator=g) * 0.02
    tm = fp8.tile_map(sizes, "cuda")
    xq, xt = fp8.TORCH_KERNELS.quantize_act_dual(x, tm)
    dyq, dyt = fp8.TORCH_KERNELS.quantize_act_dual(dy, tm)
    wq, _ = fp8.TORCH_KERNELS.quantize_weight_dual(w)
    # Fprop: y = x W_e^T per segment, same FP8 operands on both sides
    got = ft.KERNELS.grouped_gemm(xq, wq, tm, torch.float32)
    ref = fp8.TORCH_KERNELS.grouped_gemm(xq, wq, tm, torch.float32, "emulate")
    assert got.shape == ref.shape == (sum(sizes), N)
    assert fp8.sqnr_db(ref, got) > 50
    # Wgrad: dW_e = dy_e^T x_e over each segment's 128x1 tiles (empty segments give zeros)
    gw = ft.KERNELS.grouped_wgrad(dyt, xt, tm)
    rw = fp8.TORCH_KERNELS.grouped_wgrad(dyt, xt, tm, "emulate")
    assert gw.shape == rw.shape == (E, N, K)
    if any(sizes):
        assert fp8.sqnr_db(rw, gw) > 50
    for e, n in enumerate(sizes):
        if n == 0:
            assert not gw[e].any()


def test_fp8_experts_triton_path_matches_the_torch_path():
    """The routed experts' FP8 autograd function with the Triton kernels and grouped GEMMs equals
    the same function with the PyTorch kernels (forward and all three gradients)."""
    from nanoseek.quant import fp8
    _triton()
    g = torch.Generator(device="cuda").manual_seed(3)
    sizes = [200, 0, 77, 512]
    x = torch.randn(sum(sizes), 384, device="cuda", generator=g, dtype=torch.bfloat16)
    w = (torch.randn(len(sizes), 256, 384, device="cuda", generator=g) * 0.02).requires_grad_()
    res = {}
    for kernels in ("triton", "torch"):
        cfg = fp8.FP8Config(kernels=kernels, grouped="triton" if kernels == "triton" else "loop")
        xi = x.clone().requires_grad_()
        y = fp8.fp8_grouped_linear(xi, w, sizes, cfg)
        w.grad = None
        y.float().sin().sum().backward()
        res[kernels] = (y.detach().float(), xi.grad.float(), w.grad.clone())
    for a, b in zip(res["triton"], res["torch"]):
        assert (a - b).abs().max().item() <= 1e-2 * b.abs().max().item() + 1e-6
