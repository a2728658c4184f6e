#!/usr/bin/env bash
# Everything to do on a lent GPU machine, in one call, within 8 minutes on an H100/H200:
# build the CUDA extension, run the GPU tests, one small case of every CUDA kernel and of the
# Triton op under compute-sanitizer memcheck (and the CUDA kernels under racecheck), the Triton lane (no loaded kernel spills, a
# training step under sync-debug "error" and in a CUDA graph), the speed goals side by side,
# then the op benchmark and `proper bench --device cuda`. Results and logs go to $OUT (or
# benchmarks/results/ when $OUT is unset); commit the JSON/markdown from there.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
status=0

echo "== build (PROPER_BUILD_CUDA=1)"
PROPER_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-8}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    pip install --no-build-isolation --no-deps -v -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python -c 'import torch, proper_kernels; print(torch.cuda.get_device_name(), "extension:", proper_kernels.cuda_extension_error() or "loaded")'

echo "== GPU tests (the CUDA tests' emulator target runs in CI, not here)"
python -m pytest -q -x -k "not emu" tests/test_cuda_backend.py tests/test_cuda_edge_inputs.py tests/test_cuda_ops.py \
    tests/test_triton_linear.py \
    tests/test_triton_router.py tests/test_triton_training.py tests/test_compile.py tests/test_build.py \
    tests/test_auto_table.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== compute-sanitizer: memcheck (every CUDA kernel and the Triton op), racecheck (every CUDA kernel)"
if command -v compute-sanitizer > /dev/null; then
    compute-sanitizer --tool memcheck --error-exitcode 3 python -m benchmarks.gpu_check 2>&1 | tee "$OUT/memcheck.log" | tail -5
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    compute-sanitizer --tool racecheck --error-exitcode 3 python -m benchmarks.gpu_check --cuda-only 2>&1 | tee "$OUT/racecheck.log" | tail -5
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
    echo "compute-sanitizer not found; running the check without it" | tee "$OUT/memcheck.log"
    python -m benchmarks.gpu_check | tee -a "$OUT/memcheck.log" || status=1
fi

echo "== Triton lane: spills of the loaded kernels, sync-debug step, CUDA graph"
python -m benchmarks.gpu_lane 2>&1 | tee "$OUT/gpu-lane.log" | tail -8
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== speed goals, side by side (and the launch plan's predictions)"
timeout 180 python -m benchmarks.goals --out "$OUT" --backend triton || status=1
timeout 180 python -m benchmarks.goals --out "$OUT" --backend cuda || status=1
proper bench --plan --out "$OUT/launch-plan-sm90.md" > /dev/null || status=1
proper bench --plan --backend cuda --out "$OUT/launch-plan-cuda-sm90.md" > /dev/null || status=1

echo "== op and router_topk benchmarks"
python -m benchmarks.bench_op --device cuda --dtype bf16 --out "$OUT/op-$(date -u +%Y-%m-%d).json" || status=1
python -m benchmarks.bench_router --device cuda --dtype bf16 --out "$OUT/router-$(date -u +%Y-%m-%d).json" || status=1

echo "== the benchmark suite (op, block, ~1B model: forward, training step, 64-user generation)"
proper bench --device cuda --quick --out "$OUT" || status=1
exit "$status"
