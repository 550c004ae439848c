"""One shape of the decode suite through SDPA cuDNN (as peers.py calls it), for ncu: warm-up
calls, then the profiled ones. Usage: python3 one_peer_call.py B HKV L D"""
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

b, hkv, length, d = (int(x) for x in sys.argv[1:5])
q = torch.randn(b, hkv, 4, d, device="cuda", dtype=torch.bfloat16)
k = torch.randn(b, hkv, length, d, device="cuda", dtype=torch.bfloat16)
v = torch.randn(b, hkv, length, d, device="cuda", dtype=torch.bfloat16)
with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
    for _ in range(8):
        F.scaled_dot_product_attention(q, k, v)
torch.cuda.synchronize()
