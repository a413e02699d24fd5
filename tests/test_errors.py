"""Bad arguments raise errors that name the argument and say what was expected."""

import pytest
import torch

import anchor_ext
from conftest import make_inputs


@pytest.fixture
def qkv():
    return make_inputs(1, 4, 2, 64, 64)


def expect_value_error(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


def test_wrong_rank(qkv):
    q, k, v = qkv
    expect_value_error(r"q: expected a 4-D tensor .* got shape \[4, 64, 64\]", anchor_ext.prefill,
                       q[0], k, v)
    expect_value_error(r"k: expected a 4-D tensor", anchor_ext.prefill, q, k[0], v)


def test_wrong_dtype_and_mixed_dtypes(qkv):
    q, k, v = qkv
    expect_value_error(r"q: expected dtype float32, float16 or bfloat16, got Double",
                       anchor_ext.prefill, q.double(), k.double(), v.double())
    expect_value_error(r"k: expected dtype Float \(the dtype of q\), got Half", anchor_ext.prefill,
                       q, k.half(), v)
    expect_value_error(r"v: expected dtype Float", anchor_ext.prefill, q, k, v.bfloat16())


def test_shape_mismatches(qkv):
    q, k, v = qkv
    expect_value_error(r"k: expected shape \(B, Hkv, N, D\)", anchor_ext.prefill, q, k[:, :, :10], v)
    expect_value_error(r"v: expected the shape of k", anchor_ext.prefill, q, k, v[..., :32])
    expect_value_error(r"must divide the number of q heads .* Hq=4 and Hkv=3", anchor_ext.prefill,
                       q, *make_inputs(1, 3, 3, 64, 64)[1:])


def test_unsupported_head_dim():
    q, k, v = make_inputs(1, 2, 1, 16, 300)
    expect_value_error(r"q: expected head dim D in \[1, 256\] on CPU, got D=300", anchor_ext.prefill,
                       q, k, v)


def test_head_dim_needs_unit_stride(qkv):
    q, k, v = qkv
    strided = torch.randn(1, 4, 64, 128)[..., ::2]
    expect_value_error(r"q: expected unit stride on the last \(head\) dimension", anchor_ext.prefill,
                       strided, k, v)


@pytest.mark.parametrize("name,value,match", [
    ("block_size", 0, r"block_size: expected a positive integer, got 0"),
    ("block_size", -128, r"block_size: expected a positive integer, got -128"),
    ("step", 0, r"step: expected a positive integer, got 0"),
    ("init_blocks", -1, r"init_blocks: expected a non-negative integer, got -1"),
    ("local_blocks", -2, r"local_blocks: expected a non-negative integer, got -2"),
    ("sm_scale", 0.0, r"sm_scale: expected a finite positive number representable as float32, got 0"),
    ("sm_scale", float("nan"), r"sm_scale: expected a finite positive number"),
    ("sm_scale", 1e40, r"sm_scale: expected a finite positive number representable as float32"),
    ("sm_scale", 1e-50, r"sm_scale: expected a finite positive number representable as float32"),
    ("theta", float("nan"), r"theta: expected a number"),
])
def test_bad_options(qkv, name, value, match):
    expect_value_error(match, anchor_ext.prefill, *qkv, **{name: value})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_non_finite_inputs(qkv, bad, which):
    """NaN/Inf in q or k would silently drop keys, in v it would spread through every
    block reading the key: all three are scanned, with one host read."""
    q, k, v = (t.clone() for t in qkv)
    selection = anchor_ext.identify(q, k, anchor_ext.anchor(q, k))
    {"q": q, "k": k, "v": v}[which][0, 1, 5, 3] = bad
    for path in ("sparse", "dense", "auto"):
        expect_value_error(rf"{which}: expected finite values, found NaN or Inf", anchor_ext.prefill,
                           q, k, v, path=path)
    expect_value_error(rf"{which}: expected finite values", anchor_ext.sparse_attention, q, k, v,
                       selection)
    if which != "v":
        expect_value_error(rf"{which}: expected finite values", anchor_ext.anchor, q, k)


def test_finite_scan_can_be_disabled(qkv):
    q, k, v = (t.clone() for t in qkv)
    q[0, 0, 0, 0] = float("nan")
    anchor_ext.set_check_finite(False)
    try:
        anchor_ext.anchor(q, k)  # no error: the caller opted out of the scan
    finally:
        anchor_ext.set_check_finite(True)


def test_stage_inputs(qkv):
    q, k, v = qkv
    anchors = anchor_ext.anchor(q, k)
    expect_value_error(r"anchor: expected dtype float32, got Half", anchor_ext.identify, q, k,
                       anchors.half())
    expect_value_error(r"anchor: expected shape \(B, Hq, N\) = \[1, 4, 64\], got \[1, 4, 63\]",
                       anchor_ext.identify, q, k, anchors[..., :63])
    selection = anchor_ext.identify(q, k, anchors)
    expect_value_error(r"selection: expected dtype int32, got Long", anchor_ext.sparse_attention,
                       q, k, v, selection.long())
    expect_value_error(r"selection: expected shape \(B, Hq, num_groups, ceil\(N/32\)\) = "
                       r"\[1, 4, 1, 2\], got \[1, 4, 1, 1\]", anchor_ext.sparse_attention,
                       q, k, v, selection[..., :1])


def test_unknown_method_and_option(qkv):
    with pytest.raises(ValueError, match="method: expected 'anchor', 'skeleton' or 'hybrid', got 'flash'"):
        anchor_ext.prefill(*qkv, method="flash")
    with pytest.raises(TypeError, match="unexpected options"):
        anchor_ext.prefill(*qkv, window=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mix(qkv):
    q, k, v = qkv
    expect_value_error(r"k: expected device", anchor_ext.prefill, q.cuda().half(), k.half(), v.half())

