"""The static KV cache with explicit per-row positions: every cached forward equals the full forward.

Covers what speculative and tree decoding need (issue: decoding-ready generators): rows at different
lengths, per-row rollback, a draft tree verified with a mask in one pass and compacted afterwards,
embedding inputs in place of token ids, hidden states returned beside the logits, fixed buffers.
"""
import copy

import pytest
import torch

from generators.gpt import GPT
from generators.var import VAR
from tokenizers.msvq import MultiScaleVQ

ATOL = 1e-5
V, NC, L = 16, 5, 16


@pytest.fixture(autouse=True)
def _seed(one_thread):
    torch.manual_seed(0)


def gpt():
    model = GPT(V, NC, block_size=L, dim=32, depth=2, heads=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def edited(tok: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Replace every row's tokens from index start[b] on by other tokens."""
    out = tok.clone()
    for b, s in enumerate(start.tolist()):
        out[b, s:] = (tok[b, s:] + 1 + b) % V
    return out


def test_rows_at_different_lengths_and_per_row_rollback():
    model = gpt()
    B, W = 3, 6
    cond, tok = torch.arange(B) % NC, torch.randint(0, V, (B, L))
    full = model(tok, cond)  # (B, L, V); full[:, j] predicts image token j
    model.setup_cache(B)
    model.prefill(cond, tok[:, :3])  # positions 0..3 in every row
    # a per-row window at positions 4..9 (image tokens 3..8): rows need not agree, so pass a tensor
    pos = 4 + torch.arange(W).expand(B, W)  # (B, W)
    logits = model.step(tok[:, 3:3 + W], pos)
    assert torch.allclose(logits, full[:, 4:4 + W], atol=ATOL)
    assert model.cache_length is None and model.cache_lengths.tolist() == [10] * B
    # rows accept 0, 4 and 2 of the window: roll each back on its own, then continue with other tokens
    lengths = torch.tensor([4, 8, 6])
    model.rollback(lengths)
    tok2 = edited(tok, lengths - 1)  # position p holds image token p - 1
    full2 = model(tok2, cond)
    pos2 = lengths[:, None] + torch.arange(W)  # (B, W)
    inputs = torch.stack([tok2[b, s - 1:s - 1 + W] for b, s in enumerate(lengths.tolist())])
    logits2, hidden2 = model.step(inputs, pos2, return_hidden=True)
    expect = torch.stack([full2[b, s:s + W] for b, s in enumerate(lengths.tolist())])
    assert torch.allclose(logits2, expect, atol=ATOL)
    assert torch.allclose(model.head(hidden2).float(), logits2, atol=ATOL)  # hidden = the head's input
    # the stale slots of the first window would change the result if they leaked
    assert not torch.allclose(logits2[0], full[0, 4:4 + W], atol=1e-3)


def test_static_shape_step_reads_the_whole_buffer():
    """kv_len=None attends over every slot with the position mask: same logits as the sliced read."""
    model = gpt()
    cond, tok = torch.tensor([1, 2]), torch.randint(0, V, (2, L))
    model.setup_cache(2)
    model.prefill(cond, tok[:, :5])
    sliced = model.step(tok[:, 5:8], 6)
    model.truncate_cache(6)
    pos = torch.tensor([[6, 7, 8], [6, 7, 8]])
    assert torch.allclose(model.step(tok[:, 5:8], pos), sliced, atol=ATOL)
    assert torch.allclose(model.step(tok[:, 5:8], pos, kv_len=9), sliced, atol=ATOL)


@torch.no_grad()
def test_tree_verification_in_one_pass_then_compaction():
    model = gpt()
    B, P = 2, 4  # image tokens 0..3 accepted: cache positions 0..4
    cond, tok = torch.tensor([0, 3]), torch.randint(0, V, (B, L))
    # a draft tree after the prefix: node -> parent (-1 = the last accepted token)
    parent = [-1, -1, 0, 2, 1]
    depth = [1, 1, 2, 3, 2]
    n = len(parent)
    nodes = torch.randint(0, V, (B, n))
    T = model.max_cache_len + n  # tree nodes live in slots after the sequence's own
    model.setup_cache(B, max_len=T)
    model.prefill(cond, tok[:, :P])
    base = P + 1  # first free slot
    slots = (base + torch.arange(n)).expand(B, n)  # (B, n) distinct slots
    positions = torch.tensor([base + d - 1 for d in depth]).expand(B, n)  # siblings share a position
    mask = torch.zeros(n, T, dtype=torch.bool)
    mask[:, :base] = True  # the accepted prefix
    for i in range(n):
        j = i
        while j >= 0:  # the node and its ancestors
            mask[i, base + j] = True
            j = parent[j]
    logits = model.step(nodes, positions, mask=mask, slots=slots)  # (B, n, V)

    def branch(i):
        path = []
        while i >= 0:
            path.append(i)
            i = parent[i]
        return path[::-1]

    for i in range(n):
        path = branch(i)
        seq = tok.clone()
        seq[:, P:P + len(path)] = nodes[:, path]
        ref = model(seq, cond)[:, P + len(path)]  # the output of the branch's last node
        assert torch.allclose(logits[:, i], ref, atol=ATOL), i
    # accept the path 0 -> 2 -> 3 in row 0 and 1 -> 4 in row 1: compact to contiguous slots
    accepted = [[0, 2, 3], [1, 4, 4]]  # row 1 accepts 2 nodes (the last entry is padding)
    keep = torch.tensor([2 + 1, 1 + 1])  # accepted nodes per row
    src = torch.tensor([[base + j for j in row] for row in accepted])
    dst = base + torch.arange(3).expand(B, 3)
    model.move_cache(src, dst)
    model.rollback(base + keep)
    # the cache now equals a fresh prefill of the accepted sequence (row by row, valid slots only)
    for b in range(B):
        seq = torch.cat([tok[b, :P], nodes[b, accepted[b][:keep[b]]]])[None]
        fresh = copy.deepcopy(model)
        fresh.setup_cache(1, max_len=T)
        fresh.prefill(cond[b:b + 1], seq)
        for blk, ref in zip(model.blocks, fresh.blocks):
            m = base + int(keep[b])
            assert torch.allclose(blk.attn.cache.kv[:, b, :, :m], ref.attn.cache.kv[:, 0, :, :m], atol=ATOL)
    # and decoding continues from there per row
    nxt = torch.randint(0, V, (B, 1))
    pos = (base + keep)[:, None]  # (B, 1)
    out = model.step(nxt, pos)
    for b in range(B):
        seq = tok[b:b + 1].clone()
        acc = nodes[b, accepted[b][:keep[b]]]
        seq[0, P:P + len(acc)] = acc
        seq[0, P + len(acc)] = nxt[b, 0]
        assert torch.allclose(out[b, 0], model(seq, cond[b:b + 1])[0, P + len(acc) + 1], atol=ATOL)


def test_embedding_inputs_drive_the_same_backbone():
    model = gpt()
    cond, tok = torch.tensor([1, 4]), torch.randint(0, V, (2, L))
    emb = model.tok_embed(tok).detach()  # (2, L, D)
    assert torch.allclose(model(None, cond, embeds=emb[:, :-1]), model(tok, cond), atol=ATOL)
    model.setup_cache(2)
    a = torch.cat([model.prefill(cond, tok[:, :3]), model.step(tok[:, 3:6], 4)], 1)
    b = torch.cat([model.prefill(cond, emb[:, :3]), model.step(emb[:, 3:6], 4)], 1)
    assert torch.allclose(a, b, atol=ATOL)


def test_decode_steps_allocate_no_new_buffers_and_are_counted():
    model = gpt()
    cond, tok = torch.tensor([0, 1]), torch.randint(0, V, (2, L))
    model.setup_cache(2)
    ptrs = [blk.attn.cache.kv.data_ptr() for blk in model.blocks]
    with model.forward_counter() as counter:
        model.prefill(cond)
        for i in range(5):
            model.step(tok[:, i:i + 1], (i + 1) + torch.zeros(2, 1, dtype=torch.long))
    assert counter.count == 6
    assert [blk.attn.cache.kv.data_ptr() for blk in model.blocks] == ptrs


def test_hidden_states_are_returned_not_kept():
    model = gpt()
    cond, tok = torch.tensor([0, 1]), torch.randint(0, V, (2, L))
    model.train()
    logits, hidden = model(tok, cond, return_hidden=True)
    assert hidden.requires_grad and not any(torch.is_tensor(v) and v.requires_grad for v in vars(model).values())
    assert not hasattr(model, "last_hidden")


def test_var_embedding_inputs_and_hidden():
    torch.manual_seed(1)
    msvq = MultiScaleVQ(dim=8, codebook_size=V, scales=(1, 2, 4)).eval()
    model = VAR(V, NC, (1, 2, 4), code_dim=8, depth=2, width=32, heads=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    idx = [torch.randint(0, V, (2, s, s)) for s in (1, 2, 4)]
    inputs = msvq.teacher_inputs(idx)  # (2, 20, 8)
    cond = torch.tensor([1, 2])
    c = model.class_emb(cond)
    embeds = torch.cat([c[:, None] + model.pos_start, model.word_embed(inputs)], 1).detach()  # (2, 21, 32)
    full, h = model(None, cond, inputs, return_hidden=True)
    assert torch.allclose(model(None, cond, embeds=embeds), full, atol=ATOL)
    model.setup_cache(2)
    a = model.prefill(cond, embeds=embeds[:, :5])
    b = model.step(None, 2, embeds=embeds[:, 5:])
    assert torch.allclose(torch.cat([a, b], 1), full, atol=ATOL)
