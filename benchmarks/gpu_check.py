"""One small case through every CUDA op and through the Triton op (dense and grouped, fp32
and bf16), checked against the reference: the script to run under `compute-sanitizer --tool
memcheck python -m benchmarks.gpu_check` on a GPU machine (see benchmarks/run_gpu.sh).
Exits non-zero on a wrong result."""

import sys

import torch

import proper_kernels
from proper_kernels import cuda_backend, reference, triton_linear


def main() -> int:
    if not torch.cuda.is_available() or proper_kernels.cuda_extension_error():
        print("needs a CUDA GPU and the built extension:", proper_kernels.cuda_extension_error())
        return 2
    torch.manual_seed(0)
    dev = "cuda"
    T, d_in, d_out, E, k, r, r_u, N = 37, 70, 45, 6, 2, 4, 3, 5
    case = dict(
        x=torch.randn(T, d_in, device=dev), base_out=torch.randn(T, d_out, device=dev),
        lora_A=torch.randn(E, r, d_in, device=dev), lora_B=torch.randn(E, d_out, r, device=dev), scaling=1.5,
        top_k=k, temperature=0.8, router_x=torch.randn(E, d_in, device=dev),
        router_user=torch.randn(N + 1, E, device=dev), router_h=torch.randn(E, r_u, device=dev),
        user_ids=torch.randint(-1, N, (T,), device=dev), user_A=torch.randn(N, r_u, d_in, device=dev),
        user_B=torch.randn(N, d_out, r_u, device=dev), user_scaling=0.5,
    )
    worst = 0.0
    for decode_max in (cuda_backend.DECODE_MAX_TOKENS, 0):  # the fused decode kernel, then the halves
        cuda_backend.DECODE_MAX_TOKENS = decode_max
        ins = {n: case[n].clone().requires_grad_(True) for n in ("x", "lora_A", "lora_B", "router_x", "user_A")}
        y, routing = cuda_backend.proper_linear(**dict(case, **ins))
        (y.square().sum() + routing.logits.sum()).backward()
        hi = {n: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for n, v in case.items()}
        ins64 = {n: hi[n].clone().requires_grad_(True) for n in ins}
        y64, r64 = reference.proper_linear(**dict(hi, **ins64))
        (y64.square().sum() + r64.logits.sum()).backward()
        errs = {"y": (y.double() - y64).abs().max() / y64.abs().max()}
        errs.update({n: (ins[n].grad.double() - ins64[n].grad).abs().max() / ins64[n].grad.abs().max() for n in ins})
        torch.cuda.synchronize()
        print(f"decode_max={decode_max}: " + ", ".join(f"{n} {float(e):.2e}" for n, e in errs.items()))
        worst = max(worst, *(float(e) for e in errs.values()))
    print("worst relative error", worst)
    ok = worst < 1e-4
    for strategy in ("dense", "grouped"):
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
            low = {n: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                   for n, v in case.items()}
            ins = {n: low[n].clone().requires_grad_(True) for n in ("x", "lora_A", "lora_B", "router_x", "user_A")}
            y, routing = triton_linear.proper_linear(**dict(low, **ins), strategy=strategy)
            (y.float().square().sum() + routing.logits.float().sum()).backward()
            hi = {n: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for n, v in low.items()}
            ins64 = {n: hi[n].clone().requires_grad_(True) for n in ins}
            y64, r64 = reference.proper_linear(**dict(hi, **ins64))
            (y64.square().sum() + r64.logits.sum()).backward()
            errs = {"y": (y.double() - y64).abs().max() / y64.abs().max()}
            errs.update({n: (ins[n].grad.double() - ins64[n].grad).abs().max() / ins64[n].grad.abs().max()
                         for n in ins})
            torch.cuda.synchronize()
            bad = max(float(e) for e in errs.values())
            print(f"triton {strategy} {dtype}: " + ", ".join(f"{n} {float(e):.2e}" for n, e in errs.items()))
            ok = ok and bad < tol
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
