"""The compiled CUDA ops without a GPU: they register, infer shapes on meta tensors (the
same checks as on the GPU), and refuse CPU tensors and bad arguments with errors that
name the argument. Skipped where the extension is not built."""

import importlib.util
import os

import pytest
import torch

import proper_kernels

if importlib.util.find_spec("proper_kernels._C") is None:
    if os.environ.get("PROPER_EXPECT_CUDA_EXT") == "1":
        raise RuntimeError("PROPER_EXPECT_CUDA_EXT=1 but proper_kernels._C is not built")
    pytest.skip("proper_kernels._C is not built", allow_module_level=True)

import proper_kernels._C  # noqa: E402,F401

ops = torch.ops.proper
L = torch.long


def m(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


def test_extension_is_loaded_by_the_dispatcher():
    assert proper_kernels.cuda_extension_error() is None


def test_meta_shapes():
    g, i = ops.router_topk(m(5, 8, dtype=torch.bfloat16), 3, 0.7)
    assert g.shape == (5, 3) and g.dtype == torch.bfloat16 and i.dtype == L
    assert ops.router_topk_backward(m(5, 8), m(5, 3, dtype=L), m(5, 3), 1.0).shape == (5, 8)
    assert ops.bgmv_shrink(m(5, 12), m(7, 4, 12), m(5, 2, dtype=L)).shape == (5, 2, 4)
    assert ops.bgmv_shrink(m(5, 12), m(7, 12, 4), m(5, 2, dtype=L), True).shape == (5, 2, 4)
    out = ops.bgmv_expand(m(5, 2, 4), m(7, 9, 4, dtype=torch.half), m(5, 2, dtype=L), m(5, 2), m(5, 9, dtype=torch.half))
    assert out.shape == (5, 9) and out.dtype == torch.half
    out = ops.bgmv_expand(m(5, 2, 4), m(7, 4, 9), m(5, 2, dtype=L), None, None, True)
    assert out.shape == (5, 9) and out.dtype == torch.float32
    outs = ops.proper_decode(m(5, 12), m(5, 9), m(4, 3, 12), m(4, 9, 3), m(4, 12), m(7, 4), m(4, 2),
                             m(6, 2, 12), m(6, 9, 2), m(5, dtype=L), 1.0, 2, 1.0, 1.0)
    assert [tuple(o.shape) for o in outs] == [(5, 9), (5, 4), (5, 2), (5, 2), (5, 2, 3), (5, 2)]


def test_prefill_meta_shapes():
    h = torch.half
    o = ops.prefill_shrink(m(70, 40, dtype=h), m(70, 40, dtype=h), m(6, 70, dtype=L), m(4, 3, 40, dtype=h),
                           m(4, 40, dtype=h), m(7, 4, dtype=h), m(4, 5, dtype=h), m(6, 5, 40, dtype=h), 2, 1.0)
    assert [tuple(t.shape) for t in o] == [(70, 12), (70, 12), (70, 5), (70, 4), (70, 2), (70, 2)]
    assert [t.dtype for t in o] == [torch.float32, h, torch.float32, torch.float32, torch.float32, L]
    y = ops.prefill_expand(o[1], o[2], m(6, 70, dtype=L), m(4, 9, 3, dtype=h), m(6, 9, 5, dtype=h),
                           m(70, 9, dtype=h), 1.0, 1.0)
    assert y.shape == (70, 9) and y.dtype == h
    base = m(70, 9, dtype=h)
    assert ops.prefill_expand_(base, o[1], o[2], m(6, 70, dtype=L), m(4, 9, 3, dtype=h), None, 1.0, 0.0) is None
    dh, dl, dhu = ops.prefill_bwd_dh(m(70, 9, dtype=h), m(6, 70, dtype=L), m(4, 9, 3, dtype=h), m(6, 9, 5, dtype=h),
                                     m(4, 5, dtype=h), o[0], o[3], o[4], o[5], None, m(70, 4), 1.0, 1.0, 1.0)
    assert (dh.shape, dh.dtype, dl.shape, dhu.shape) == ((70, 12), h, (70, 4), (70, 5))
    dxl, dxr = ops.prefill_bwd_dx(dh, dl, dhu, m(6, 70, dtype=L), m(4, 3, 40, dtype=h), m(4, 40, dtype=h),
                                  m(6, 5, 40, dtype=h), True)
    assert dxl.shape == dxr.shape == (70, 40) and dxl.dtype == h
    _, dxr = ops.prefill_bwd_dx(dh, dl, dhu, m(6, 70, dtype=L), m(4, 3, 40, dtype=h), None, None, True)
    assert dxr.shape == (0, 40)


def shrink(**kw):
    args = dict(x=m(70, 40), x_lora=m(70, 40), plan=m(6, 70, dtype=L), lora_A=m(4, 3, 40), router_x=None,
                router_user=None, router_h=None, user_A=None, top_k=2, temperature=1.0)
    args.update(kw)
    return ops.prefill_shrink(*args.values())


@pytest.mark.parametrize(
    "call,pattern",
    [
        (lambda: shrink(plan=m(6, 69, dtype=L)), "'plan' must have shape \\[6, 70\\]"),
        (lambda: shrink(plan=m(6, 70)), "'plan' must be int64"),
        (lambda: shrink(x_lora=m(70, 41)), "'x_lora' must have shape"),
        (lambda: shrink(lora_A=m(4, 3, 40, dtype=torch.half)), "'lora_A' has dtype"),
        (lambda: shrink(top_k=5), "'top_k' must be in \\[1, 4\\]"),
        (lambda: shrink(router_x=m(4, 39)), "'router_x' must have shape"),
        (lambda: shrink(router_h=m(4, 2)), "'router_h' needs the user bank"),
        (lambda: shrink(user_A=m(6, 2, 40), router_user=m(6, 4)), "'router_user' must have size 7"),
        (lambda: shrink(lora_A=m(64, 4, 40), router_x=m(64, 40)), "columns E\\*r \\+ E \\+ r_u .* are 320"),
        (lambda: ops.prefill_expand(m(70, 12), m(70, 0), m(6, 70, dtype=L), m(4, 9, 4), None, m(70, 9), 1.0, 0.0),
         "'hg' must have shape"),
        (lambda: ops.prefill_expand(m(70, 12), m(70, 5, dtype=torch.half), m(6, 70, dtype=L), m(4, 9, 3), None,
                                    m(70, 9), 1.0, 0.0), "'hu' must be float32"),
        (lambda: ops.prefill_bwd_dh(m(70, 9), m(6, 70, dtype=L), m(4, 9, 3), None, None, m(70, 12), m(70, 4),
                                    m(70, 2), m(70, 3, dtype=L), None, None, 1.0, 0.0, 1.0), "'indices' must have shape"),
        (lambda: ops.prefill_bwd_dh(m(70, 9), m(6, 70, dtype=L), m(4, 9, 3), None, None, m(70, 12), m(70, 4),
                                    m(70, 2), m(70, 2, dtype=L), None, m(70, 5), 1.0, 0.0, 1.0),
         "'dlogits' must have shape"),
        (lambda: ops.prefill_bwd_dx(m(70, 12), m(70, 4), m(70, 0), m(6, 70, dtype=L), m(4, 3, 40), m(4, 41), None,
                                    False), "'router_x' must have shape"),
        (lambda: ops.router_topk(m(5, 8), 9, 1.0), "'top_k' must be in \\[1, 8\\]"),
        (lambda: ops.router_topk(m(5, 8), 2, 0.0), "'temperature' must be positive"),
        (lambda: ops.router_topk(m(5, 8, dtype=torch.float64), 2, 1.0), "'logits' must have dtype"),
        (lambda: ops.router_topk(m(5, 2000), 2, 1.0), "'logits' must have between 1 and 1024"),
        (lambda: ops.router_topk_backward(m(5, 8), m(5, 3, dtype=torch.int32), m(5, 3), 1.0), "'indices' must be int64"),
        (lambda: ops.router_topk_backward(m(5, 8), m(5, 3, dtype=L), m(5, 2), 1.0), "'dgates' must have the shape"),
        (lambda: ops.bgmv_shrink(m(5, 12), m(7, 4, 11), m(5, 2, dtype=L)), "'weight' must have size 12"),
        (lambda: ops.bgmv_shrink(m(5, 12), m(7, 4, 12, dtype=torch.half), m(5, 2, dtype=L)), "'weight' has dtype"),
        (lambda: ops.bgmv_shrink(m(5, 12), m(7, 4, 12), m(4, 2, dtype=L)), "'indices' must have size 5"),
        (lambda: ops.bgmv_shrink(m(5, 12).t(), m(7, 4, 5), m(12, 2, dtype=L)), "'x' must be contiguous"),
        (lambda: ops.bgmv_expand(m(5, 2, 4, dtype=torch.half), m(7, 9, 4), m(5, 2, dtype=L)), "'h' must be float32"),
        (lambda: ops.bgmv_expand(m(5, 2, 4), m(7, 9, 4), m(5, 3, dtype=L)), "'indices' must have shape"),
        (lambda: ops.bgmv_expand(m(5, 2, 4), m(7, 9, 4), m(5, 2, dtype=L), m(5, 3)), "'scale' must have shape"),
        (lambda: ops.bgmv_expand(m(5, 2, 4), m(7, 9, 4), m(5, 2, dtype=L), None, m(5, 8)), "'base' must have shape"),
        (lambda: ops.bgmv_expand(m(5, 2, 4), m(7, 9, 4), m(5, 2, dtype=L), None, m(5, 9, dtype=torch.half)),
         "'base' must be float32 or the dtype of 'weight'"),
        (lambda: ops.proper_decode(m(5, 12), m(5, 9), m(4, 3, 12), m(4, 9, 2), None, None, None, None, None,
                                   m(5, dtype=L), 1.0, 2, 1.0, 0.0), "'lora_B' must have shape"),
        (lambda: ops.proper_decode(m(5, 12), m(5, 9), m(4, 3, 12), m(4, 9, 3), None, None, None, m(6, 2, 12), None,
                                   m(5, dtype=L), 1.0, 2, 1.0, 0.0), "'user_A' and 'user_B' must be given together"),
        (lambda: ops.proper_decode(m(5, 12), m(5, 9), m(4, 3, 12), m(4, 9, 3), None, m(8, 4), None, m(6, 2, 12),
                                   m(6, 9, 2), m(5, dtype=L), 1.0, 2, 1.0, 0.0), "'router_user' must have size 7"),
        (lambda: ops.proper_decode(m(5, 12), m(5, 9), m(4, 3, 12), m(4, 9, 3), None, None, None, None, None,
                                   m(4, dtype=L), 1.0, 2, 1.0, 0.0), "'user_ids' must have size 5"),
    ],
)
def test_bad_arguments_are_named(call, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        call()


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: ops.router_topk(torch.ones(3, 4), 1, 1.0), "logits"),
        (lambda: ops.router_topk_backward(torch.ones(3, 4), torch.zeros(3, 1, dtype=L), torch.ones(3, 1), 1.0), "logits"),
        (lambda: ops.bgmv_shrink(torch.ones(3, 4), torch.ones(2, 2, 4), torch.zeros(3, 1, dtype=L)), "x"),
        (lambda: ops.bgmv_expand(torch.ones(3, 1, 2), torch.ones(2, 4, 2), torch.zeros(3, 1, dtype=L)), "h"),
        (lambda: ops.proper_decode(torch.ones(3, 4), torch.ones(3, 5), torch.ones(2, 2, 4), torch.ones(2, 5, 2),
                                   None, None, None, None, None, torch.zeros(3, dtype=L), 1.0, 1, 1.0, 0.0), "x"),
        (lambda: ops.prefill_shrink(torch.ones(3, 4), torch.ones(3, 4), torch.zeros(6, 3, dtype=L),
                                    torch.ones(2, 2, 4), None, None, None, None, 1, 1.0), "x"),
        (lambda: ops.prefill_expand(torch.ones(3, 4), torch.ones(3, 0), torch.zeros(6, 3, dtype=L),
                                    torch.ones(2, 5, 2), None, torch.ones(3, 5), 1.0, 0.0), "hg"),
        (lambda: ops.prefill_expand_(torch.ones(3, 5), torch.ones(3, 4), torch.ones(3, 0), torch.zeros(6, 3, dtype=L),
                                     torch.ones(2, 5, 2), None, 1.0, 0.0), "hg"),
        (lambda: ops.prefill_bwd_dh(torch.ones(3, 5), torch.zeros(6, 3, dtype=L), torch.ones(2, 5, 2), None, None,
                                    torch.ones(3, 4), torch.ones(3, 2), torch.ones(3, 1), torch.zeros(3, 1, dtype=L),
                                    None, None, 1.0, 0.0, 1.0), "dy"),
        (lambda: ops.prefill_bwd_dx(torch.ones(3, 4), torch.ones(3, 2), torch.ones(3, 0), torch.zeros(6, 3, dtype=L),
                                    torch.ones(2, 2, 4), None, None, False), "dh"),
    ],
)
def test_cpu_tensors_get_a_clear_error(call, name):
    with pytest.raises(RuntimeError, match=f"argument '{name}' must be a CUDA tensor"):
        call()


def test_dispatcher_refuses_cuda_backend_on_cpu_tensors():
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run on cpu.*need CUDA tensors"):
        proper_kernels.proper_linear(x, torch.zeros(3, 5), torch.zeros(2, 2, 4), torch.zeros(2, 5, 2), 1.0,
                                     top_k=1, backend="cuda")
