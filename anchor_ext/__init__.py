"""anchor_ext: AnchorAttention sparse prefill for long-context LLMs.

Quick start::

    import anchor_ext
    out = anchor_ext.prefill(q, k, v)            # or torch.ops.anchor.prefill(q, k, v)
    out = anchor_ext.prefill_varlen(q, k, v, cu_seqlens)   # packed prompts (total, H, D)

Hugging Face transformers: :mod:`anchor_ext.integrations.transformers` registers the
``"anchor"`` attention implementation.

Modules: :mod:`anchor_ext.ops` (the API and fake impls), :mod:`anchor_ext.reference`
(pure-PyTorch definitions of every op), :mod:`anchor_ext.recall` (the recall target's
probe), :mod:`anchor_ext.families` (evaluation inputs), :mod:`anchor_ext.skeleton` (SparseSkeleton: the
PyTorch method and its CUDA path), :mod:`anchor_ext.metrics` (sparsity, recall, error), :mod:`anchor_ext.synthetic` (realistic long-context inputs), ``python -m
anchor_ext.demo`` (the demo).
"""

from .ops import (RECALL_DEFAULTS, anchor, built_with_cuda, identify, prefill, prefill_varlen,
                  set_check_finite, sparse_attention)
from .reference import SparseConfig

__version__ = "0.1.0"
__all__ = ["prefill", "prefill_varlen", "anchor", "identify", "sparse_attention", "built_with_cuda",
           "set_check_finite", "SparseConfig", "RECALL_DEFAULTS"]
