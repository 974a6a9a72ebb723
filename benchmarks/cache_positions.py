"""Time greedy decoding=ar (the forward passes and the KV cache, no sampler) of one checkout of tokar.

    python benchmarks/cache_positions.py <repo root> <gpt|var>      -> prints the best of 2 batch-16 calls, seconds

Used to check that per-row cache positions cost no speed: run it alternately on a checkout of the old cache
(git worktree add /tmp/orig 9c5d686) and on this one, 5 rounds each (benchmarks/RESULTS.md, "KV cache").
"""
import sys, time, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
from decoding.ar import generate
kind = sys.argv[2]
torch.manual_seed(0)
if kind == "gpt":
    from generators.gpt import GPT
    model = GPT(1024, 10, block_size=256, dim=384, depth=6, heads=6).eval()   # GPT-d6 shape, 16x16 tokens
    tok = None
else:
    from generators.var import VAR
    from tokenizers.msvq import MultiScaleVQ
    scales = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    tok = MultiScaleVQ(dim=32, codebook_size=4096, scales=scales).eval()
    model = VAR(4096, 10, scales, code_dim=32, depth=6).eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.02 * torch.randn_like(p))
cond = torch.arange(16) % 10
s = dict(cfg_scale=1.5, temperature=0.0)
kw = {"tokenizer": tok} if tok is not None else {}
generate(model, cond[:2], s, None, **kw)  # warm-up
t = []
for _ in range(2):
    t0 = time.perf_counter(); out, _ = generate(model, cond, s, None, **kw); t.append(time.perf_counter() - t0)
print(min(t))
