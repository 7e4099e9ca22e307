"""Is the W8A8 serving path (nanoseek.fp8_weights, w8a8=True) right on this machine, and how much
does its error grow with depth? Random-init presets saved as FP8 checkpoints: the logits' SQNR of
the W8A8 model against the dequantized fp32 model, with the FP8 GEMM on `torch._scaled_mm` and
on the exact emulation (dequantize, fp32 matmul), and one W8A8 Linear on random inputs.
    PYTHONPATH=. python dev/check_w8a8.py
"""
import tempfile
import torch
import torch.nn.functional as F
from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.fp8 import sqnr_db
import nanoseek.fp8_weights as fw
dev = "cuda" if torch.cuda.is_available() else "cpu"
for preset in (["nano", "small"] if dev == "cuda" else ["nano"]):
    cfg = ModelConfig.from_preset(preset, num_nextn_predict_layers=0)
    tmp = tempfile.mkdtemp()
    DeepSeekV3.from_config(cfg, seed=0).save_pretrained(tmp, fp8=True)
    x = torch.randint(2, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0)).to(dev)
    ref = DeepSeekV3.from_pretrained(tmp, dtype=torch.float32, device=dev).eval()
    with torch.no_grad():
        lr = ref(x).float()
    print(preset, "layers", cfg.num_hidden_layers, "hidden", cfg.hidden_size, flush=True)
    orig = fw.fp8_gemm
    for be in (["scaled_mm", "emulate"] if dev == "cuda" else ["emulate"]):
        fw.fp8_gemm = lambda a, b, dt, _o=orig, _b=be: _o(a, b, dt, backend=_b)
        m, _ = fw.load_fp8_weights(tmp, dtype=torch.float32, device=dev, w8a8=True)
        m.eval()
        with torch.no_grad():
            lg = m(x).float()
            lin = next(mod for mod in m.modules() if isinstance(mod, fw.FP8WeightLinear))
            xi = torch.randn(64, lin.weight_fp8.shape[1], device=dev)
            one = sqnr_db(F.linear(xi, lin.weight), lin(xi))
        print(f"  {be}: logits SQNR {sqnr_db(lr, lg):.2f} dB; one W8A8 Linear on randn {one:.2f} dB", flush=True)
    fw.fp8_gemm = orig
