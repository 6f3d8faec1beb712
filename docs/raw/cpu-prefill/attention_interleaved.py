"""One triangle layer's attention on CPU, SmolLM2 shapes (9 query / 3 kv heads, head_dim 64), float32:
dense causal SDPA vs triangle_sdpa (n_init 8, n_local 512, last_n 128), interleaved (dense, triangle,
dense, ...), REPS each; medians of wall and process CPU seconds. The band mask is cached after the
warm-up call, as it is for the 2nd-9th triangle layers of one prefill. Usage: attention_interleaved.py [REPS]"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from trimix_probe.triangle_sdpa import triangle_attention_sdpa

reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, reps {reps}")
for seq in (4096, 8192):
    g = torch.Generator().manual_seed(seq)
    q = torch.randn(1, 9, seq, 64, generator=g)
    k, v = (torch.randn(1, 3, seq, 64, generator=g) for _ in range(2))
    fns = {"dense": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
           "triangle_sdpa": lambda: triangle_attention_sdpa(q, k, v, n_init=8, n_local=512, last_n=128)}
    times = {name: ([], []) for name in fns}
    for name, fn in fns.items():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            times[name][0].append(time.perf_counter() - w)
            times[name][1].append(time.process_time() - c)
    med = {name: (statistics.median(w), statistics.median(c)) for name, (w, c) in times.items()}
    print(f"seq {seq}: " + ", ".join(f"{n} wall {w * 1000:.0f} ms cpu {c * 1000:.0f} ms" for n, (w, c) in med.items())
          + f"; triangle/dense wall {med['triangle_sdpa'][0] / med['dense'][0]:.2f} cpu "
          f"{med['triangle_sdpa'][1] / med['dense'][1]:.2f}", flush=True)
