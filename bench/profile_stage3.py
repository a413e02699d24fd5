"""One launch of each stage on realistic inputs, for Nsight Compute (ncu) profiles.

    ncu --kernel-name regex:gather_attention --launch-skip 2 --launch-count 1 python3 bench/profile_stage3.py 32768
"""
import sys

import torch

import anchor_ext
from anchor_ext import synthetic

n = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
anchor_ext.set_check_finite(False)
q, k, v = synthetic.make_qkv(n, device="cuda", seed=0)
anchors = anchor_ext.anchor(q, k)                            # launch 1 (stage 1)
selection = anchor_ext.identify(q, k, anchors)               # identify kernel
out, lse = anchor_ext.sparse_attention(q, k, v, selection)   # launch 2 (stage 3)
anchors = anchor_ext.anchor(q, k)                            # launch 3
out, lse = anchor_ext.sparse_attention(q, k, v, selection)   # launch 4
torch.cuda.synchronize()
