"""Helpers of the test suite, in one place: test modules import them from here and never from
one another or from conftest.py (tests/test_test_layout.py checks that).

models       tiny Hugging Face models, the families the patching tests run over, PROPER configs
cases        random cases of the fused op and the covering grid of shapes (torch only)
stages       the stage tests' batches and records, and a stage-2 model with a known move
kernels      a backend's proper_linear checked against the float64 reference (tolerance from the caller)
naive        an independent per-token loop of ProperLinear, the oracle of the reference
distributed  what the 2-rank workers share with the one-process runs they are compared with

pytest's default (prepend) import mode puts tests/ on sys.path, so `from _helpers.models
import LLAMA` works from the repository root and from tests/.
"""
