"""The Triton checks that need a GPU (run by benchmarks/run_gpu.sh):

1. no loaded Triton kernel spills: after the goal cases ran, every compiled kernel in the
   JIT caches reports n_spills == 0 (the driver's count, beside the compile gate's);
2. one training step of a patched layer runs under torch.cuda.set_sync_debug_mode("error"),
   so a host sync anywhere in the forward or the backward raises;
3. the same step is captured in a CUDA graph and replayed: the same gradients.

Exits non-zero on any failure.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

import proper
import proper_kernels
from proper_kernels import cost


def run_goal_cases() -> None:
    """Forward and backward of every goal case on the Triton backend (bf16), to load the kernels."""
    from benchmarks.goals import tensors

    for c in cost.CASES:
        t = tensors(c, torch.device("cuda"), torch.bfloat16, max(c.users, 1) * 4)
        ps = {n: t[n].requires_grad_(True) for n in ("x", "lora_A", "lora_B", "router_x", "router_user",
                                                     "router_h", "user_A", "user_B")}
        base = (ps["x"] @ t["weight"].t()).detach()
        y = proper_kernels.proper_linear(base_out=base, scaling=2.0, top_k=c.k, user_ids=t["user_ids"],
                                         user_scaling=1.0, backend="triton", **ps)
        y.float().square().mean().backward()
    torch.cuda.synchronize()


def triton_modules() -> list:
    """Every proper_kernels.triton_* module: each strategy's file holds its own kernels."""
    import importlib
    import pkgutil

    return [importlib.import_module(f"proper_kernels.{m.name}") for m in pkgutil.iter_modules(proper_kernels.__path__)
            if m.name.startswith("triton_")]


def spills() -> list[str]:
    bad, seen = [], 0
    for module in triton_modules():
        for name in dir(module):
            fn = getattr(module, name)
            caches = getattr(fn, "device_caches", None)
            if not caches:
                continue
            for cache in caches.values():
                for kernel in cache[0].values():
                    kernel._init_handles()
                    seen += 1
                    if kernel.n_spills:
                        bad.append(f"{name}: {kernel.n_spills} spilled registers ({kernel.n_regs} registers)")
    print(f"loaded Triton kernels: {seen}, spilling: {len(bad)}")
    return bad if seen else ["no Triton kernel was loaded"]


def patched_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512, bias=False)).cuda().to(torch.bfloat16)
    cfg = proper.ProperConfig(num_experts=8, top_k=2, rank=16, user_rank=16, num_users=32,
                              router=("token", "user", "lora"), backend="triton", target_modules=("0",))
    proper.patch_model(model, cfg)
    for layer in proper.proper_layers(model).values():
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.02)
            layer.user_B.normal_(0, 0.02)
    return model


def step(model, x, users):
    with proper.user_context(model, users):
        y = model(x)
    y.float().square().mean().backward()


def no_sync_and_graph() -> list[str]:
    problems = []
    model = patched_layer()
    x = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
    users = torch.tensor([3, -1, 7, 3], device="cuda")
    step(model, x, users)  # compile and warm up outside the checks
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    from proper_kernels._checks import check_id_range

    check_id_range(users, 32)  # user_context validates once, with a sync, before the step
    patch_ctx = proper.user_context(model, users)
    patch_ctx.__enter__()
    try:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = model(x)
            y.float().square().mean().backward()
        except RuntimeError as e:
            problems.append(f"a host sync in the training step: {e}")
        finally:
            torch.cuda.set_sync_debug_mode(0)
        eager = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        # CUDA graph: capture the step once (on a side stream, after a warm-up there), replay it
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                for p in params:
                    p.grad = None
                model(x).float().square().mean().backward()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        for p in params:
            p.grad = None
        with torch.cuda.graph(graph):
            model(x).float().square().mean().backward()
        graph.replay()
        torch.cuda.synchronize()
        for p, g in zip(params, eager):
            if not torch.allclose(p.grad.float(), g.float(), rtol=1e-2, atol=1e-3):
                problems.append("the CUDA-graph replay gave other gradients than the eager step")
                break
    except Exception as e:  # capture failures are reported, not raised
        problems.append(f"CUDA graph capture failed: {type(e).__name__}: {e}")
    finally:
        patch_ctx.__exit__(None, None, None)
    return problems


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_lane: needs a CUDA GPU", file=sys.stderr)
        return 2
    run_goal_cases()
    problems = spills() + no_sync_and_graph()
    for p in problems:
        print("FAIL", p)
    print("gpu_lane:", "ok" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
