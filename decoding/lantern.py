"""Draft-head speculative decoding with LANTERN's relaxed acceptance (``decoding=lantern``) for the raster GPT.

One iteration per target forward, every row on its own length n_b (tokens 0..n_b-1 fixed):
1. token n_b is drawn from the distribution the last verification left for it (the target's next-token
   distribution after a full acceptance, else the residual of the first rejection);
2. the draft head (generators/draft_head.py) drafts x_1..x_D from the target's feature at slot n_b and the
   token embeddings, each x_j ~ q_j (the draft logits after the same CFG / temperature / top-k / top-p), or
   ``draft=greedy``: x_j = argmax q_j (siblings: the next most likely), verified as q = 1 (LANTERN's and
   EAGLE-2's default): accept with p̃(x), so each step's output is r_x, within δ of p, with no mixture target;
3. ``tree=chain``: one target step feeds [token n_b, x_1..x_D] at per-row positions; ``tree=static``: an
   EAGLE-1-style fixed tree (``branching``: the children per depth, siblings drawn without replacement)
   is fed in one step with a tree mask, and the accepted path is compacted with ``move_cache``;
4. ``verify(p, q, x, u) -> (accepted, residual)`` (one position, batched; ``lantern_verifier``: LANTERN's
   δ / λ rule over the neighbour table) runs from the root; a row keeps every draft up to its first rejection
   (tree: the first accepted sibling at each depth; a rejected sibling's residual is the next one's target)
   and rolls its cache back to what it kept. The acceptance rule is the only thing a caller passes in.

δ = 0, λ = 1 or k = 0 is standard speculative sampling (exact). Stats: accepted_lengths (per row-iteration,
drafts kept), mean_accepted_length (mean of accepted + 1 per row-iteration), step_compression (tokens per
target forward).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from decoding.lantern_accept import TARGETS, lantern_verify, sample_from_uniform, validate_neighbours
from decoding.registry import register
from decoding.sampling import SamplingConfig, cfg_split_combine, logits_to_probs

TREES = ("chain", "static")
DRAFTS = ("sample", "greedy")


@dataclass
class LanternSettings:
    """decoding=lantern's settings."""

    drafter_ckpt: str | None = None  # the drafter run (train.py task=drafter generator_ckpt=<this GPT run>)
    depth: int = 5  # D: drafted tokens per target forward (chain) / tree depth (static)
    tree: str = "chain"  # chain | static
    branching: tuple = (2, 2, 1, 1, 1)  # static tree: children per node at each depth (len == depth)
    delta: float | None = 0.1  # LANTERN's TV budget (0 = standard speculative sampling)
    lam: float | None = None  # LANTERN++'s λ >= 1 (set delta=null to use it)
    k: int = 1000  # neighbours per code (0 = standard speculative sampling)
    target: str = "mixture"  # relaxed target for sampled drafts: mixture (TV <= δ) | pointwise (LANTERN's rule)
    draft: str = "sample"  # sample: x ~ q, verified against q | greedy: x = argmax q, verified as q = 1 (LANTERN's default)
    drafter: torch.nn.Module | None = dataclasses.field(default=None, init=False, repr=False)  # loaded by prepare
    neighbours: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False)  # (V, k) int64
    drafter_config: dict | None = dataclasses.field(default=None, init=False, repr=False)
    checked_model: int | None = dataclasses.field(default=None, init=False, repr=False)
    verifier: tuple | None = dataclasses.field(default=None, init=False, repr=False)  # (key, verify) of the last call

    def __post_init__(self):
        if self.tree not in TREES:
            raise ValueError(f"decoding.tree={self.tree!r}; choose one of {', '.join(TREES)}")
        if self.depth < 1:
            raise ValueError(f"decoding.depth={self.depth} must be >= 1")
        if self.draft not in DRAFTS:
            raise ValueError(f"decoding.draft={self.draft!r}; choose one of {', '.join(DRAFTS)}")
        if self.target not in TARGETS:
            raise ValueError(f"decoding.target={self.target!r}; choose one of {', '.join(TARGETS)}")
        if (self.delta is None) == (self.lam is None):
            raise ValueError("set exactly one of decoding.delta (LANTERN) or decoding.lam (LANTERN++; then "
                             "decoding.delta=null)")
        self.branching = tuple(int(b) for b in self.branching)
        if self.tree == "static" and (len(self.branching) != self.depth or min(self.branching) < 1):
            raise ValueError(f"decoding.branching={list(self.branching)} must list depth={self.depth} counts >= 1")

    def rule(self) -> dict:
        return {"delta": self.delta} if self.delta is not None else {"lam": self.lam}


def codebook_neighbours(config: dict, k: int, device) -> torch.Tensor:
    """The (V, k) nearest-code table of the generator run's tokenizer (decoding/neighbours.py, cached beside the
    tokenizer run; k is capped at V - 1)."""
    from decoding.neighbours import codebook_neighbours as knn

    V = int(config["model_args"]["vocab_size"])
    return knn(config["tokenizer"]["path"], min(k, V - 1), device)[0]


def _prepare(settings: LanternSettings, config: dict, device) -> LanternSettings:
    """Load the drafter run and the neighbour table; its pairing with the generator's weights is checked on the
    first ``generate`` (the weights are what the drafter records)."""
    from generators.draft_head import DraftHead
    from utils.runs import check_kind, read_checkpoint

    if not settings.drafter_ckpt:
        raise ValueError("decoding=lantern needs a draft head: decoding.drafter_ckpt=<drafter run folder> "
                         "(python train.py task=drafter generator_ckpt=<this gpt run>)")
    dconfig, state, _, _ = read_checkpoint(settings.drafter_ckpt)
    check_kind(dconfig, "drafter", settings.drafter_ckpt, role="decoding.drafter_ckpt")
    head = DraftHead(**dconfig["model_args"])
    head.load_state_dict(state)
    settings.drafter, settings.drafter_config = head.to(device).eval(), dconfig
    relaxed = settings.k > 0 and ((settings.delta or 0) > 0 or (settings.lam or 1) > 1)
    if relaxed:
        settings.neighbours = codebook_neighbours(config, settings.k, device)
    return settings


def check_pairing_once(settings: LanternSettings, model) -> None:
    """Refuse a drafter trained for another generator (weights hash; computed once per model object)."""
    from generators.drafter_module import check_drafter_pairing, weights_hash

    if settings.drafter_config is not None and settings.checked_model != id(model):
        check_drafter_pairing(settings.drafter_config, weights_hash(model), settings.drafter_ckpt,
                              "the generator being sampled")
        settings.checked_model = id(model)


def verifier_once(settings: LanternSettings, vocab: int) -> Callable:
    """The settings' verifier, built (and its neighbour table validated, with host reads) once per table and rule."""
    greedy = settings.draft == "greedy"
    key = (id(settings.neighbours), vocab, tuple(settings.rule().items()), settings.target, greedy)
    if settings.verifier is None or settings.verifier[0] != key:
        settings.verifier = (key, lantern_verifier(settings.neighbours, vocab, settings.rule(), settings.target, greedy))
    return settings.verifier[1]


def lantern_verifier(nbrs: torch.Tensor | None, vocab: int, rule: dict, target: str = "mixture",
                     one_hot: bool = False) -> Callable:
    """The relaxed acceptance as ``verify(p, q, x, u) -> (accept (B,) bool, residual (B, V), tv (B,))``: p, q (B, V),
    x, u (B,); tv = TV(p, T), T the relaxed target the step samples exactly (0 when exact). nbrs None or k = 0:
    standard speculative sampling. ``one_hot``: q is ignored and every draft is verified as q = 1 (drafts that are
    a deterministic function of the drafter's state, ``decoding.draft=greedy``): accept with p̃(x), else draw from
    p without the aggregated set; the step's output is then exactly r_x, within δ of p, whatever chose x."""
    if nbrs is None:
        nbrs = torch.zeros(vocab, 0, dtype=torch.long)
    validate_neighbours(nbrs)
    on_device = {nbrs.device: nbrs}  # the table on each device it met (one upload per device, not per call)

    def verify(p, q, x, u):
        table = on_device.get(p.device)
        if table is None:
            table = on_device.setdefault(p.device, nbrs.to(p.device))
        verdict = lantern_verify(p, None if one_hot else q, x, u, table, target=target, **rule)
        return verdict.accept, verdict.residual, 0.5 * (verdict.target - p).abs().sum(-1)
    return verify


def _probs(logits: torch.Tensor, B: int, sampling: SamplingConfig, guided: bool) -> torch.Tensor:
    """(B', ..., V) logits -> (B, ..., V) sampling distribution (CFG on the [cond; uncond] batch)."""
    if guided:
        logits = cfg_split_combine(logits, sampling.cfg_scale)
    return logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)


def _uniform(shape, device, generator) -> torch.Tensor:
    return torch.rand(shape, device=device, generator=generator)


@torch.no_grad()
def speculative_generate(model, drafter, cond: torch.Tensor, sampling: SamplingConfig, verify: Callable,
                         depth: int = 5, generator: torch.Generator | None = None, tree: str = "chain",
                         branching: tuple = (), draft: str = "sample") -> tuple[torch.Tensor, dict]:
    """Draft-head speculative decoding -> (tokens (B, L) int64, stats). See the module docstring. ``draft``:
    "sample" (x ~ q) or "greedy" (x = argmax q; pair it with a one-hot verifier, ``lantern_verifier(one_hot=True)``).

    One host read per iteration (the shortest row's length: stop, or draw the last token and stop, or go on) and
    two for the statistics; the tree's topology lives on the host (``_tree``) and its index tensors are uploaded
    once per device (``_tree_tensors``).
    """
    sampling = SamplingConfig.from_any(sampling)
    if sampling.cfg_interval >= 0:
        raise ValueError("decoding=lantern applies CFG to every token; set sampling.cfg_interval=-1")
    B, L, dev = cond.shape[0], model.block_size, cond.device
    guided = sampling.cfg_scale != 1.0
    labels = model.cls_embed.with_null(cond) if guided else cond  # (B',)
    Bp = labels.shape[0]
    R = Bp // B  # 2 with CFG
    topo = _tree(depth, tree, tuple(branching))
    ix = _tree_tensors(topo, dev)
    N = topo.N  # draft nodes (chain: D)
    model.setup_cache(Bp, L + N + 3, device=dev)
    drafter.setup_cache(Bp, head_cache_len(L, N, depth), device=dev)
    logits, h = model.prefill(labels, return_hidden=True)  # (B', 1, V), (B', 1, D)
    # F[:, i] predicts token i; slots past L are scratch for the kept-path writes (never read as a valid input)
    feats = torch.zeros(Bp, L + depth + 2, model.dim, dtype=h.dtype, device=dev)
    feats[:, 0] = h[:, 0]
    tokens = torch.zeros(B, L + depth + 1, dtype=torch.long, device=dev)  # tokens L..: scratch
    n = torch.zeros(B, dtype=torch.long, device=dev)  # (B,) fixed tokens per row
    nxt = _probs(logits[:, 0], B, sampling, guided)  # (B, V) distribution of token n
    rows = torch.arange(B, device=dev)
    keeps, actives, forwards = [], [], 1
    tv_rows = torch.zeros(B, dtype=torch.float64, device=dev)  # (B,) summed TV of every verification per row
    verified_rows = torch.zeros(B, dtype=torch.long, device=dev)  # (B,) positions verified per row
    while True:
        shortest = int(n.min())  # the one host read per iteration
        if shortest >= L:
            break
        active = n < L  # (B,)
        # 1. token n from the distribution the last verification left
        t0 = sample_from_uniform(nxt, _uniform((B,), dev, generator))  # (B,)
        at = n.clamp(max=L)
        tokens[rows, at] = torch.where(active, t0, tokens[rows, at])
        if shortest == L - 1:  # every active row just drew its last token
            break
        # 2. draft the tree (chain: one node per depth) with the draft head
        x, q = _draft(model, drafter, feats, tokens, n, topo, B, R, sampling, guided, generator,
                      draft == "greedy")  # (B, N), (B, N, V)
        # 3. one target forward over [t0, nodes] (tree mask, per-row positions)
        lg, hh, tok_idx, slots = tree_step(model, n, t0, x, topo, R)  # (B', N+1, V), (B', N+1, D)
        forwards += 1
        p = _probs(lg, B, sampling, guided)  # (B, N+1, V): p[:, j] predicts the token after input j
        # 4. verify along the tree: walk from the root, trying siblings in order (chain: one per depth)
        path, keep, nxt, tv, verified = _walk(verify, p, q, x, topo, tok_idx, L, generator)
        # path (B, depth) node ids (-1 beyond), keep (B,) accepted drafts, nxt (B, V) distribution of the next token
        keep = torch.where(active, keep, torch.zeros_like(keep))
        keeps.append(keep)
        actives.append(active)
        tv_rows += torch.where(active, tv, 0.0)
        verified_rows += torch.where(active, verified, 0)
        inputs_kept = commit_path(model, n, slots, path, keep, R, ix["offsets"])  # (B, depth+1) inputs of the path
        # 5. write the kept tokens n+1..n+keep and the features of slots n+1..n+1+keep (one scatter each)
        dst = n[:, None] + 1 + ix["offsets"][None]  # (B, depth+1) distinct per row: scratch past L
        ok = active[:, None] & (ix["offsets"][None] <= keep[:, None])  # (B, depth+1) kept features
        kept_x = x.gather(1, path.clamp(min=0))  # (B, depth)
        ok_x = active[:, None] & (ix["offsets"][None, :depth] < keep[:, None])  # (B, depth) kept drafts
        tokens.scatter_(1, dst[:, :depth], torch.where(ok_x, kept_x, tokens.gather(1, dst[:, :depth])))
        hk = hh.gather(1, inputs_kept.repeat(R, 1)[:, :, None].expand(-1, -1, hh.shape[-1]))  # (B', depth+1, D)
        dst_f = dst.repeat(R, 1)[:, :, None].expand(-1, -1, feats.shape[-1])  # (B', depth+1, D)
        feats.scatter_(1, dst_f, torch.where(ok.repeat(R, 1)[:, :, None], hk, feats.gather(1, dst_f)))
        n = torch.where(active, (n + 1 + keep).clamp(max=L), n)
    model.free_cache()
    drafter.free_cache()
    return tokens[:, :L], _stats(keeps, actives, tv_rows, verified_rows, depth, L, B, forwards)


def _stats(keeps: list, actives: list, tv_rows: torch.Tensor, verified_rows: torch.Tensor, depth: int, L: int, B: int,
           forwards: int) -> dict:
    """The call's statistics from the per-iteration keep (B,) and active (B,) tensors (two host reads)."""
    acc = []
    if keeps:
        kept, act = torch.stack([torch.stack(keeps), torch.stack(actives).long()]).tolist()  # 2 x (I, B)
        acc = [k for ks, a_s in zip(kept, act) for k, a in zip(ks, a_s) if a]  # row-iterations of active rows
    tv_pos, tv_comp, ver = torch.stack([tv_rows.sum() / verified_rows.sum().clamp(min=1), tv_rows.mean(),
                                        verified_rows.double().mean()]).tolist()
    return {"accepted_lengths": acc, "mean_accepted_length": (sum(acc) + len(acc)) / len(acc) if acc else float("nan"),
            "step_compression": L / forwards, "target_forwards": forwards, "row_forward_passes": len(acc) / B,
            "acceptance_by_draft_index": [sum(a > i for a in acc) / len(acc) for i in range(depth)] if acc else [],
            # the measured TV budget: the per-position TV(p, relaxed target) averaged over verified positions, and
            # its sum along a sequence (mean over rows), which bounds TV(output joint, target joint) (hybrid argument)
            "tv_per_position": tv_pos, "tv_composed": tv_comp, "verified_positions": ver}


def tree_step(model, n: torch.Tensor, t0: torch.Tensor, x: torch.Tensor, topo: DraftTree, R: int = 1):
    """One target forward over [t0, the N draft nodes] for rows at lengths n (B,): t0 (B,) is token n, node j
    (B,) is token n + depth(j) on the path of its parents. Input 0 sits at slot n + 1, node j at slot n + 2 + j,
    with position ids = token index + 1 and a tree mask (ancestors + the committed prefix).
    -> (logits (B', N+1, V), hidden (B', N+1, D), token indices (B, N+1), slots (B, N+1))."""
    L, ix = model.block_size, _tree_tensors(topo, n.device)
    inp = torch.cat([t0[:, None], x], 1).repeat(R, 1)  # (B', N+1)
    tok_idx = n[:, None] + ix["input_depth"][None]  # (B, N+1)
    slots = n[:, None] + ix["input_slot"][None]  # (B, N+1)
    mask = _tree_mask(n, slots, ix["ancestors"], model.blocks[0].attn.cache.max_len)  # (B, N+1, T)
    lg, hh = model.step(inp, (tok_idx + 1).clamp(max=L).repeat(R, 1), mask=mask.repeat(R, 1, 1),
                        slots=slots.repeat(R, 1), return_hidden=True)
    return lg, hh, tok_idx, slots


def commit_path(model, n: torch.Tensor, slots: torch.Tensor, path: torch.Tensor, keep: torch.Tensor, R: int = 1,
                offsets: torch.Tensor | None = None):
    """Compact the accepted path into consecutive slots (slot of token i = i + 1) and roll every row back to
    class + its tokens up to the first unverified one; path (B, depth) node ids, keep (B,) accepted nodes;
    offsets: arange(depth + 1) on the device (built here when not given).
    -> (B, depth+1) indices into the step's inputs of [t0, path] (beyond keep: t0, unused)."""
    depth = path.shape[1]
    offsets = torch.arange(depth + 1, device=n.device) if offsets is None else offsets  # (depth+1,)
    inputs_kept = torch.cat([torch.zeros_like(n)[:, None], path.clamp(min=0) + 1], 1)  # (B, depth+1)
    src = slots.gather(1, inputs_kept)  # (B, depth+1)
    dst = n[:, None] + 1 + offsets[None]  # (B, depth+1)
    valid = offsets[None] <= keep[:, None]
    model.move_cache(torch.where(valid, src, dst).repeat(R, 1), dst.repeat(R, 1))
    model.rollback((n + 2 + keep).repeat(R))  # class + tokens 0..n+keep
    return inputs_kept


@dataclass(frozen=True)
class DraftTree:
    """The draft tree's topology as host lists (BFS order; parent -1 = the root t0; depths 1-based)."""

    parent: tuple  # (N,) parent node of each node, -1 = t0
    node_depth: tuple  # (N,) 1-based depth of each node

    @property
    def N(self) -> int:
        return len(self.parent)

    @functools.cached_property
    def depth(self) -> int:
        return max(self.node_depth)

    @functools.cached_property
    def levels(self) -> tuple:
        """Node ids per depth 1..depth."""
        return tuple(tuple(j for j in range(self.N) if self.node_depth[j] == d) for d in range(1, self.depth + 1))

    @functools.cached_property
    def kids(self) -> tuple:
        """Children of every input in order: kids[c + 1] of node c (kids[0]: of t0)."""
        return tuple(tuple(j for j in range(self.N) if self.parent[j] == c) for c in range(-1, self.N))

    def children(self, c: int) -> tuple:
        """Children of node c (-1: of t0), in order."""
        return self.kids[c + 1]

    @functools.cached_property
    def branches(self) -> bool:
        """Some node has more than one child (a tree mask is needed; a chain is causal by position)."""
        return max(len(k) for k in self.kids) > 1

    def ancestors(self) -> list:
        """(N+1, N+1) bool lists: input j's ancestors including itself (input 0 = t0, input j + 1 = node j)."""
        anc = [[i == j for i in range(self.N + 1)] for j in range(self.N + 1)]
        for j in range(self.N):  # BFS order: a parent's row is complete before its children's
            anc[j + 1] = [a or b for a, b in zip(anc[j + 1], anc[self.parent[j] + 1])]
        return anc


@functools.cache
def _tree(depth: int, tree: str, branching: tuple) -> DraftTree:
    """The draft tree of a setting (chain: one node per depth; static: ``branching`` children per node per depth)."""
    counts = [1] * depth if tree == "chain" else list(branching)
    parent, node_depth, frontier = [], [], [-1]
    for d, c in enumerate(counts):
        nxt = []
        for par in frontier:
            for _ in range(c):
                parent.append(par)
                node_depth.append(d + 1)
                nxt.append(len(parent) - 1)
        frontier = nxt
    return DraftTree(tuple(parent), tuple(node_depth))


@functools.cache
def _tree_tensors(topo: DraftTree, device: torch.device) -> dict:
    """The tree's index tensors on a device, uploaded once per (tree, device): input_depth (N+1,) token offset of
    each input from n, input_slot (N+1,) its slot offset from n (t0 at 1, node j at 2 + j), ancestors (N+1, N+1) bool,
    children (N+1, width) node ids (-1 = none), levels (ids per depth), offsets arange(depth + 1)."""
    N = topo.N
    kids = [list(k) for k in topo.kids]  # children of input c + 1
    width = max(len(k) for k in kids)
    return {"input_depth": torch.tensor((0,) + topo.node_depth, device=device),
            "input_slot": torch.arange(1, N + 2, device=device),
            "ancestors": torch.tensor(topo.ancestors(), dtype=torch.bool, device=device),
            "children": torch.tensor([c + [-1] * (width - len(c)) for c in kids], device=device),
            "levels": [torch.tensor(level, device=device) for level in topo.levels],
            "offsets": torch.arange(topo.depth + 1, device=device)}


def _tree_mask(n: torch.Tensor, slots: torch.Tensor, ancestors: torch.Tensor, T: int) -> torch.Tensor:
    """(B, N+1, T) bool: input j sees the committed slots <= n and the slots of its ancestors (and itself);
    ancestors (N+1, N+1) bool on n's device."""
    base = _arange(T, n.device)[None, None] <= n[:, None, None]  # (B, 1, T) class + tokens < n
    tree = torch.zeros(n.shape[0], ancestors.shape[0], T, dtype=torch.bool, device=n.device)
    tree.scatter_(2, slots[:, None, :].expand(-1, ancestors.shape[0], -1), ancestors[None].expand(n.shape[0], -1, -1))
    return base | tree


@functools.cache
def _arange(T: int, device: torch.device) -> torch.Tensor:
    """arange(T) on a device, built once (the slot ids of a tree mask)."""
    return torch.arange(T, device=device)


def head_cache_len(L: int, N: int, depth: int) -> int:
    """Slots of the draft head's cache: inputs 0..L, the catch-up window's padding past them, the tree nodes."""
    return L + N + depth + 3


def _draft(model, drafter, feats, tokens, n, topo: DraftTree, B, R, sampling, guided, generator, greedy=False):
    """Draft every tree node over the head's KV cache -> (x (B, N) int64, q (B, N, V)); siblings are drawn
    without replacement (``greedy``: the most likely codes in order, x = argmax of what is left).

    Head slot i holds input (F[:, i], token i) for i < c (c = ``drafter.cache_lengths``, per row: what the
    last call left true). 1. Catch up: one head step feeds slots c..c+depth (the target's true features and the
    kept tokens; entries past n are padding, overwritten later and never visible to a valid query), and its
    output at slot n (token n = t0) predicts the feature of token n+1; every row then rolls back to c = n+1.
    2. Per depth d < depth, one head step feeds the nodes of depth d (their parent's predicted feature, their
    token) at slots n+1+j, position n+d (chain: causal by position; static tree: a tree mask), and its outputs
    predict their children. Each row runs depth head steps of at most depth+1 inputs, none over the prefix.
    The topology is read from the host lists of ``topo`` (no host read of a device value).
    """
    N, dev, L, depth = topo.N, feats.device, model.block_size, topo.depth
    ix = _tree_tensors(topo, dev)
    x = torch.zeros(B, N, dtype=torch.long, device=dev)
    q = torch.zeros(B, N, model.vocab_size, device=dev)
    nR = n.repeat(R)  # (B',)
    # 1. catch up from the head's valid length c to slot n
    c = drafter.cache_lengths.clone()  # (B',)
    slots = c[:, None] + ix["offsets"][None]  # (B', depth+1)
    idx = slots.clamp(max=L)
    f_in = feats.gather(1, idx[..., None].expand(-1, -1, feats.shape[-1]))  # (B', depth+1, D)
    out = drafter.step(model, f_in, tokens.repeat(R, 1).gather(1, idx), idx, slots)  # (B', depth+1, D)
    feat_of = {-1: out.gather(1, (nR - c).clamp(0, depth)[:, None, None].expand(-1, 1, out.shape[-1]))[:, 0]}  # (B', D)
    drafter.rollback(nR + 1)
    # 2. the tree, depth by depth
    mask = None
    if topo.branches:  # a static tree: tree mask over the head's slots (t0 at n, node j at n + 1 + j)
        hslots = n[:, None] + ix["input_slot"][None] - 1  # (B, N+1)
        mask = _tree_mask(n, hslots, ix["ancestors"], head_cache_len(L, N, depth)).repeat(R, 1, 1)  # (B', N+1, T)
    for d, level in enumerate(topo.levels, 1):
        for par in sorted({topo.parent[j] for j in level}):
            probs = _probs(drafter.logits(model, feat_of[par]), B, sampling, guided)  # (B, V)
            left = probs.clone()
            for j in topo.children(par):  # siblings without replacement
                qj = left / left.sum(-1, keepdim=True).clamp(min=1e-30)
                xj = qj.argmax(-1) if greedy else sample_from_uniform(qj, _uniform((B,), dev, generator))
                x[:, j], q[:, j] = xj, qj
                left = left.scatter(-1, xj[:, None], 0.0)
        if d == depth:
            break
        ids = ix["levels"][d - 1]  # (m,)
        f_in = torch.stack([feat_of[topo.parent[j]] for j in level], 1)  # (B', m, D)
        pos = (nR + d).clamp(max=L)[:, None].expand(-1, len(level))  # (B', m)
        out = drafter.step(model, f_in, x[:, ids].repeat(R, 1), pos, nR[:, None] + 1 + ids[None],
                           None if mask is None else mask[:, ids + 1])  # (B', m, D)
        feat_of.update({j: out[:, i] for i, j in enumerate(level)})
    return x, q


def _walk(verify, p, q, x, topo: DraftTree, tok_idx, L, generator):
    """Verify from the root: at each depth try the current node's children in order; a rejected sibling's
    residual is the target of the next one (recursive rejection sampling; siblings were drafted without
    replacement, each verified with the distribution it was drawn from) -> (path (B, depth) node ids, -1 beyond
    the last kept; keep (B,) kept drafts; the next token's distribution (B, V); tv (B,) the summed TV(target,
    relaxed target) of every verification tried: the position's output is within it of p; verified (B,) the
    positions verified)."""
    B, dev, depth = x.shape[0], x.device, topo.depth
    table = _tree_tensors(topo, dev)["children"]  # (N+1, width), -1 = none
    path = torch.full((B, depth), -1, dtype=torch.long, device=dev)
    keep = torch.zeros(B, dtype=torch.long, device=dev)
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    cur = torch.full((B,), -1, dtype=torch.long, device=dev)  # current node (-1 = t0, input 0)
    target = p[:, 0]  # (B, V) distribution of the token after t0
    rows = torch.arange(B, device=dev)
    tv = torch.zeros(B, dtype=p.dtype, device=dev)
    verified = torch.zeros(B, dtype=torch.long, device=dev)
    for d in range(depth):
        chosen = torch.full((B,), -1, dtype=torch.long, device=dev)
        for s in range(table.shape[1]):
            kid = table[cur + 1, s]  # (B,)
            kc = kid.clamp(min=0)
            try_it = alive & (chosen < 0) & (kid >= 0) & (tok_idx[rows, kc + 1] < L)
            acc, resid, tv_s = verify(target, q[rows, kc], x[rows, kc], _uniform((B,), dev, generator))
            tv = tv + torch.where(try_it, tv_s.to(tv.dtype), 0.0)
            verified = verified + (try_it & (s == 0))
            acc = acc & try_it
            chosen = torch.where(acc, kid, chosen)
            target = torch.where((try_it & ~acc)[:, None], resid, target)
        ok = chosen >= 0
        path[:, d] = chosen
        keep = keep + ok.long()
        alive = alive & ok
        cur = torch.where(ok, chosen, cur)
        target = torch.where(ok[:, None], p[rows, cur + 1], target)
    return path, keep, target, tv, verified


@register("lantern", applies_to=("gpt",), settings=LanternSettings, prepare=_prepare)
def generate(model, cond, sampling: SamplingConfig, generator, tokenizer, settings: LanternSettings):
    """Draft-head speculative decoding with relaxed acceptance -> (tokens (B, L), stats)."""
    if settings.drafter is None:
        raise ValueError("decoding=lantern: the draft head is not loaded; pass decoding.drafter_ckpt and call "
                         "get_decoder('lantern').prepare(settings, run_config, device) first (sample.py does)")
    check_pairing_once(settings, model)
    verify = verifier_once(settings, model.vocab_size)
    settings.drafter.eval()
    return speculative_generate(model, settings.drafter, cond, sampling, verify, settings.depth, generator,
                                settings.tree, settings.branching, settings.draft)
