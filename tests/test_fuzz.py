"""Randomized differential tests (anchor_ext.fuzz): every op against the reference.

The GPU run draws cases over batch, GQA ratio, N up to 20k with odd tails, D 64/128,
fp16/bf16, layouts, geometry, theta from -inf to inf and selections from identify,
SparseSkeleton and random bitmasks; a failure prints the seed that replays it
(``python -m bench.fuzz --seed SEED --cases 1``). ``bench/fuzz.py`` runs the long
version (>= 1000 cases) and saves its counts under ``bench/results/``. The CPU run
checks the harness and the CPU ops on a few small cases.
"""

import os

import pytest

from anchor_ext import fuzz
from conftest import HAS_CUDA

GPU_CASES = int(os.environ.get("ANCHOR_FUZZ_CASES", "60"))
SEED_BASE = int(os.environ.get("ANCHOR_FUZZ_SEED", "1000"))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build")
def test_fuzz_cuda_against_reference():
    counts = fuzz.run_cases(range(SEED_BASE, SEED_BASE + GPU_CASES), "cuda")
    print({key: value for key, value in counts.items() if key != "failures"})
    assert counts["failed"] == 0, counts["failures"]


def test_fuzz_cpu_small_cases():
    counts = fuzz.run_cases(range(8), "cpu", max_tokens=600, max_row_heads=2048)
    assert counts["cases"] == 8 and counts["failed"] == 0, counts["failures"]


def test_fuzz_case_is_a_function_of_its_seed():
    assert fuzz.draw_case(123).describe() == fuzz.draw_case(123).describe()
    assert len({fuzz.draw_case(seed).describe() for seed in range(50)}) == 50


def test_fuzz_reports_a_failing_op(monkeypatch):
    """A wrong op makes the harness fail (the test can fail)."""
    from anchor_ext import ops

    real = ops.sparse_attention

    def off_by_a_bit(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out + 0.1, lse

    monkeypatch.setattr(ops, "sparse_attention", off_by_a_bit)
    case = fuzz.draw_case(3, max_tokens=300, max_row_heads=1024)
    case.n = max(case.n, 64)
    failures = fuzz.run_case(case, "cpu")
    assert any(f.startswith("sparse_attention out") for f in failures), failures
