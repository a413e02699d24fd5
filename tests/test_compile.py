"""opcheck on every op, and torch.compile(fullgraph=True) of prefill (fake impls)."""

import pytest
import torch

import anchor_ext
from conftest import make_inputs

GEOMETRY = dict(block_size=32, step=2, init_blocks=1, local_blocks=1)


def op_cases(device="cpu", dtype=torch.float32):
    """(op, args, kwargs) of every op; CUDA keeps block_size 128 and a longer N for the same regions."""
    geometry, n = (GEOMETRY, 200) if device == "cpu" else (dict(step=2), 800)
    q, k, v = make_inputs(1, 4, 2, n, 64, dtype, device=device, seed=1)
    anchors = anchor_ext.anchor(q, k, **geometry)
    selection = anchor_ext.identify(q, k, anchors, theta=3.0, **geometry)
    return [
        (torch.ops.anchor.anchor.default, (q, k), geometry),
        (torch.ops.anchor.identify.default, (q, k, anchors), dict(theta=3.0, **geometry)),
        (torch.ops.anchor.sparse_attention.default, (q, k, v, selection), geometry),
        (torch.ops.anchor.prefill.default, (q, k, v), dict(theta=3.0, **geometry)),
    ]


@pytest.mark.parametrize("case", range(4))
def test_opcheck_cpu(case):
    op, args, kwargs = op_cases()[case]
    torch.library.opcheck(op, args, kwargs)


def test_compile_prefill_fullgraph():
    q, k, v = make_inputs(1, 4, 2, 300, 64, seed=4)

    def attention_layer(q, k, v):
        out = torch.ops.anchor.prefill(q * 1.0, k, v, theta=3.0, **GEOMETRY)
        return out.transpose(1, 2).flatten(2)  # what a model does next

    compiled = torch.compile(attention_layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), attention_layer(q, k, v))


def test_compile_python_api():
    q, k, v = make_inputs(1, 2, 1, 130, 64, seed=6)
    compiled = torch.compile(lambda q, k, v: anchor_ext.prefill(q, k, v, theta=2.0, **GEOMETRY),
                             fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), anchor_ext.prefill(q, k, v, theta=2.0, **GEOMETRY))
