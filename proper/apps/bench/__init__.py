"""`proper bench`: speed and memory of proper against what a user would otherwise run.

    proper bench [--device cpu|cuda] [--quick] [--out DIR] [--repeats N] [--levels op,block,...] [--table]

On CUDA it first times each backend per phase and writes the table that backend="auto"
reads on this GPU (proper_kernels.auto_table; --table does only that). ``--plan`` prints
the launch plan with its roofline cost instead (proper_kernels.cost; no GPU, no timing).

Writes ``<DIR>/<device>-<date>.json`` (default DIR: benchmarks/results) in the one result
schema (schema.py: a header with device, versions, date and settings, and rows with the
same keys at every level), the markdown table next to it (.md) and PNG plots of the op
sweeps (plots.py). ``python -m benchmarks.bench_op`` writes the same schema for the op
level's goal cases in every mode.

Variants (each row names it; ``kind`` says which is the floor, ours, or a baseline):

  linear / base       the frozen layer or model alone, no adapters: the floor
  proper              ProperLinear through the dispatcher (backend "auto": torch on the CPU,
                      the CUDA extension or Triton on a GPU); proper-<backend> one backend
  proper-compile      our torch reference path under ``torch.compile``
  peft-moe            the PEFT-style mixture (baselines.PeftStyleLayer): a module pair per
                      expert and per user, a router, Python loops
  peft-mixed          (model level) the ``peft`` library: one LoRA adapter per user, a mixed
                      batch with ``adapter_names=``
  peft-shared         (model level) ``peft`` with one LoRA shared by every sequence: what a
                      plain LoRA costs, the reference point of "personalization overhead"
  lora                (training step) plain peft LoRA

Levels: ``op`` (one layer; sweeps over tokens, users, experts: op.py), ``block`` (one Llama
decoder layer), ``model`` (a whole Llama, forward of a 64-user mixed batch), ``train`` (a
training step) and ``generate`` (batched generation): model.py.

Timing (timing.py, the one timer): on the CPU, time.perf_counter over interleaved rounds;
on CUDA, CUDA events through ``triton.testing.do_bench`` with the L2 cache flushed, rotating
between input sets larger than the L2 cache for the op level. The same run measures the
device's peaks (a large matmul and a device copy) for the roofline columns.
"""

from __future__ import annotations

from .baselines import PeftStyleLayer, patch_peft_style, peft_mixed
from .main import LEVELS, _compile_works, default_rounds, main, measure_auto_table, resolve_device, run, settings
from .model import ModelCase, build_models, model_case, train_models
from .op import (InputSet, OpCase, Variant, available_backends, cast_layer, goal_cases, make_inputs, make_layer,
                 make_variants, num_input_sets, op_cases, proper_call)
from .op_run import run_op, run_op_case
from .plots import plots
from .schema import (DTYPES, HEADER_FIELDS, KINDS, ROW_FIELDS, SCHEMA, _fmt, device_info, device_name, finish_rows,
                     header, make_row, markdown, slug, versions, write)
from .timing import (Timing, _quantiles, describe_overhead, measure_peaks, paired_overhead, peak_mib,
                     resolved_at_noise, time_interleaved)

__all__ = [
    "DTYPES", "HEADER_FIELDS", "KINDS", "LEVELS", "ROW_FIELDS", "SCHEMA", "InputSet", "ModelCase", "OpCase",
    "PeftStyleLayer", "Timing", "Variant", "available_backends", "build_models", "cast_layer", "default_rounds",
    "describe_overhead", "device_info", "device_name", "finish_rows", "goal_cases", "header", "main", "make_inputs",
    "make_layer", "make_row", "make_variants", "markdown", "measure_auto_table", "measure_peaks", "model_case",
    "num_input_sets", "op_cases", "paired_overhead", "patch_peft_style", "peak_mib", "peft_mixed", "plots",
    "proper_call", "resolve_device", "resolved_at_noise", "run", "run_op", "run_op_case", "settings", "slug",
    "time_interleaved", "train_models", "versions", "write", "_compile_works", "_fmt", "_quantiles",
]
