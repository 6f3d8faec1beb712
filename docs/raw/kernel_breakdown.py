# Per-launch breakdown of the triangle kernel and the configs autotune picked (made docs/raw/kernel-breakdown-h100.txt).
# Run on a GPU: python3 docs/raw/kernel_breakdown.py
import os, torch, triton, triton.testing
from trimix_probe.kernels import triangle as T
d=torch.device("cuda")
for seq in (32768, 131072):
    q=torch.randn(1,32,seq,128,device=d,dtype=torch.bfloat16); k=torch.randn(1,8,seq,128,device=d,dtype=torch.bfloat16); v=torch.randn_like(k)
    full=lambda: T.triangle_attention(q,k,v)
    band=lambda: T.triangle_attention(q,k,v,last_n=0)
    qt=q.transpose(1,2).contiguous().transpose(1,2)
    tr=lambda: T.triangle_attention(qt,k,v)
    for name,f in (("full",full),("band_only",band),("full_q_transposed",tr)):
        f(); print(seq, name, round(triton.testing.do_bench(f, warmup=50, rep=300, return_mode="median"),4), "ms", flush=True)
    for kern in (T._band_kernel, T._last_kernel):
        print("  best", kern.fn.__name__ if hasattr(kern,'fn') else kern, {str(k)[:60]: str(c) for k,c in kern.cache.items()})
