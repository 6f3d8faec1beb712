"""An LRU model of the vertical-slash kernel's slash-tile traffic, old grid (all heads of a query tile
together) vs new (one kv head's q heads and query tiles together): 264 resident programs advance one
K/V tile (64 keys, K+V 32 KB) a step, a finished one is replaced in launch order, L2 = 1600 tiles
(50 MB). Llama-3.1-8B heads (32 q / 8 kv), 48 bands of 128 a head, tile 64; "diag": the first 48
bands for every head, "scatter": 48 random bands a head. A model, not a measurement (CPU, 2026-12-07):
output in l2_model.txt."""
import random, collections
def sim(seq, pattern, order, resident=264, cap_tiles=1600, heads=32, kvh=8, nb=48, seed=0):
    T=64; nq=seq//T; G=heads//kvh
    rnd=random.Random(seed)
    if pattern=='diag':
        offs={h: sorted(set(d for o in range(nb) for d in (2*o, 2*o+1, 2*o+2))) for h in range(heads)}
    else:
        nbands=seq//128
        offs={}
        for h in range(heads):
            bands=rnd.sample(range(nbands), nb)
            offs[h]=sorted(set(d for o in bands for d in (2*o,2*o+1,2*o+2)))
    # program list in launch order
    if order=='old':
        progs=[(h, nq-1-mi) for mi in range(nq) for h in range(heads)]
    else:
        progs=[(k*G+g, nq-1-mi) for k in range(kvh) for mi in range(nq) for g in range(G)]
    cache=collections.OrderedDict(); miss=acc=0
    def touch(key):
        nonlocal miss, acc
        acc+=1
        if key in cache: cache.move_to_end(key)
        else:
            miss+=1; cache[key]=1
            if len(cache)>cap_tiles: cache.popitem(last=False)
    # waves: resident programs progress in lockstep one tile per step; a finished program is replaced
    queue=collections.deque(progs); active=[]
    def start():
        h,m=queue.popleft(); tiles=[m-d for d in offs[h] if d<=m]; return [h//G, tiles, 0]
    while queue and len(active)<resident: active.append(start())
    while active:
        nxt=[]
        for p in active:
            k,tiles,i=p
            if i<len(tiles):
                touch((k,tiles[i])); p[2]+=1; nxt.append(p)
            elif queue: nxt.append(start())
        active=nxt
    return acc, miss
for seq in (32768, 131072):
    for pat in ('diag','scatter'):
        for order in ('old','new'):
            a,m=sim(seq,pat,order)
            print(seq, pat, order, 'accesses', a, 'misses', m, f'{m/a:.3f}', flush=True)
