"""The op-level cases of `proper bench` through pytest-benchmark:

    pytest benchmarks/test_op_benchmark.py --benchmark-only [--benchmark-json FILE]

One layer call (forward, no grad) of each case of ``proper.apps.bench.op_cases`` (quick sizes on
the CPU, the GPU sizes on CUDA) for our dispatcher, the floor (the frozen linear alone) and
the PEFT-style baseline, built by the harness's own ``make_variants``. CPU timings only
when no GPU is present.
"""

import pytest
import torch

from proper.apps.bench import cast_layer, make_inputs, make_layer, make_variants, op_cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = op_cases(DEVICE, quick=DEVICE.type == "cpu")


@pytest.mark.parametrize("variant", ["linear", "proper", "peft-moe"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.sweep}-T{c.tokens}-u{c.users}-E{c.experts}")
def test_op(benchmark, case, variant):
    torch.manual_seed(0)
    layer = cast_layer(make_layer(case, DEVICE, DTYPE), DTYPE)
    (s,) = make_inputs(case, 1, DEVICE, DTYPE, grad=False)
    (v,) = [v for v in make_variants(layer, {"proper": "auto"}) if v.name == variant]

    def call():
        out = v.fn(s)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    with torch.inference_mode():
        out = benchmark(call)
    assert out.shape == (case.batch, case.seq, case.d_out) and bool(torch.isfinite(out).all())
