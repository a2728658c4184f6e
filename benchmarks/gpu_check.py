"""One small case through every CUDA kernel and through the Triton op (dense and grouped,
fp32 and bf16), checked against the float64 reference: the script to run under
compute-sanitizer on a GPU machine (benchmarks/run_gpu.sh runs it under memcheck, and its
CUDA part, ``--cuda-only``, under racecheck). Exits non-zero on a wrong result.

CUDA kernels covered: the decode kernels (inference, few tokens), the four tensor-core
prefill kernels (training: forward and backward; inference in place), the BGMV kernels
(shapes wider than the tensor-core kernels hold) and router_topk forward/backward, in fp32,
fp16 and bf16."""

import argparse
import sys

import torch

import proper_kernels
from proper_kernels import cuda_backend, reference, triton_linear

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
TRAINED = ("x", "lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_case(dev, T=37, d_in=72, d_out=45, E=6, k=2, r=4, r_u=3, N=5):
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=dev, generator=g)  # noqa: E731
    return dict(
        x=rnd(T, d_in), base_out=rnd(T, d_out), lora_A=rnd(E, r, d_in) * 0.5, lora_B=rnd(E, d_out, r) * 0.5,
        scaling=1.5, top_k=k, temperature=0.8, router_x=rnd(E, d_in), router_user=rnd(N + 1, E),
        router_h=rnd(E, r_u), user_ids=torch.randint(-1, N, (T,), device=dev, generator=g),
        user_A=rnd(N, r_u, d_in) * 0.5, user_B=rnd(N, d_out, r_u) * 0.5, user_scaling=0.5)


def errors(fn, case, dtype, train=True, **kw):
    """Relative errors of y (and of every gradient when `train`) against the reference."""
    low = {n: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for n, v in case.items()}
    hi = {n: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for n, v in low.items()}
    rel = lambda a, b: float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1e-30))  # noqa: E731
    if not train:
        with torch.no_grad():
            y, routing = fn(**dict(low, **kw))
        y64, r64 = reference.proper_linear(**hi)
        _sync()
        return {"y": rel(y, y64), "gates": rel(routing.gates, r64.gates)}
    ins = {n: low[n].clone().requires_grad_(True) for n in TRAINED}
    y, routing = fn(**dict(low, **ins, **kw))
    (y.float().square().sum() + routing.logits.float().sum() + routing.gates.float().sum()).backward()
    ins64 = {n: hi[n].clone().requires_grad_(True) for n in TRAINED}
    y64, r64 = reference.proper_linear(**dict(hi, **ins64))
    (y64.square().sum() + r64.logits.sum() + r64.gates.sum()).backward()
    _sync()
    out = {"y": rel(y, y64)}
    out.update({n: rel(ins[n].grad, ins64[n].grad) for n in TRAINED})
    return out


def report(name, errs, tol) -> bool:
    worst = max(errs.values())
    print(f"{name}: worst {worst:.2e} (tol {tol:.0e}): " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    return worst <= tol


def cuda_checks(dev) -> bool:
    ok = True
    case = make_case(dev)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        tol = TOL[dtype]
        ok &= report(f"cuda decode {dtype}", errors(cuda_backend.proper_linear, case, dtype, train=False), tol)
        ok &= report(f"cuda tensor-core training {dtype}", errors(cuda_backend.proper_linear, case, dtype), tol)
        saved = cuda_backend.DECODE_MAX_TOKENS
        cuda_backend.DECODE_MAX_TOKENS = 0
        try:
            ok &= report(f"cuda tensor-core inference in place {dtype}",
                         errors(cuda_backend.proper_linear, case, dtype, train=False, inplace=True), tol)
        finally:
            cuda_backend.DECODE_MAX_TOKENS = saved
        saved = cuda_backend.PREFILL_MAX_COLUMNS
        cuda_backend.PREFILL_MAX_COLUMNS = 0
        try:
            ok &= report(f"cuda BGMV training {dtype}", errors(cuda_backend.proper_linear, case, dtype), tol)
        finally:
            cuda_backend.PREFILL_MAX_COLUMNS = saved
        logits = (case["x"][:, :16] * 3).to(dtype).requires_grad_(True)
        gates, idx = cuda_backend.router_topk(logits, 3, 0.7)
        ref_in = logits.detach().double().requires_grad_(True)
        g64, _ = reference.router_topk(ref_in, 3, 0.7)
        gates.double().square().sum().backward()
        g64.square().sum().backward()
        _sync()
        rel = lambda a, b: float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max())  # noqa: E731
        ok &= report(f"cuda router_topk {dtype}", {"gates": rel(gates, g64), "dlogits": rel(logits.grad, ref_in.grad)},
                     tol)
    return ok


def triton_checks(dev) -> bool:
    ok = True
    case = make_case(dev)
    for strategy in ("dense", "grouped"):
        for dtype in (torch.float32, torch.bfloat16):
            fn = lambda **kw: triton_linear.proper_linear(**kw, strategy=strategy)  # noqa: E731
            ok &= report(f"triton {strategy} {dtype}", errors(fn, case, dtype), TOL[dtype])
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--cuda-only", action="store_true", help="only the CUDA extension's kernels")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or proper_kernels.cuda_extension_error():
        print("needs a CUDA GPU and the built extension:", proper_kernels.cuda_extension_error())
        return 2
    ok = cuda_checks("cuda")
    if not args.cuda_only:
        ok &= triton_checks("cuda")
    print("gpu_check:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
