"""The op-level cases of `proper bench` through pytest-benchmark:

    pytest benchmarks/test_op_benchmark.py --benchmark-only [--benchmark-json FILE]

One layer call (forward, no grad) of each case of ``proper.apps.bench.op_cases`` (quick sizes on
the CPU, the GPU sizes on CUDA) for our dispatcher, the floor (the frozen linear alone) and
the PEFT-style baseline. CPU timings only when no GPU is present.
"""

import pytest
import torch
import torch.nn.functional as F

import proper_kernels
from proper.apps.bench import PeftStyleLayer, _op_layer, op_cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = op_cases(DEVICE, quick=DEVICE.type == "cpu")


@pytest.mark.parametrize("variant", ["linear", "proper", "peft-moe"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.sweep}-T{c.tokens}-u{c.users}-E{c.experts}")
def test_op(benchmark, case, variant):
    torch.manual_seed(0)
    layer = _op_layer(case, DEVICE, DTYPE).eval()
    ids_host = [u % case.users for u in range(case.batch)]
    ids = torch.tensor(ids_host, device=DEVICE)
    x = torch.randn(case.batch, case.seq, case.d_in, device=DEVICE, dtype=DTYPE)
    W = layer.base.weight
    if variant == "linear":
        fn = lambda: F.linear(x, W)  # noqa: E731
    elif variant == "proper":
        def fn():
            return proper_kernels.proper_linear(
                x, F.linear(x, W), layer.lora_A, layer.lora_B, layer.scaling, top_k=layer.top_k,
                router_x=layer.router_x, router_user=layer.router_user, user_ids=ids, user_A=layer.user_A,
                user_B=layer.user_B, user_scaling=layer.user_scaling, check_user_ids=False, inplace=True)
    else:
        peft_layer = PeftStyleLayer(layer, case.users).eval()
        names = [f"u{u}" for u in ids_host]
        fn = lambda: peft_layer(x, names, ids)  # noqa: E731

    def call():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    with torch.inference_mode():
        out = benchmark(call)
    assert out.shape == (case.batch, case.seq, case.d_out) and bool(torch.isfinite(out).all())
