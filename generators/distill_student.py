"""Distilled decoding's training side (DD1): the teacher's (noise, tokens) pairs, the student, its LightningModule.

``train.py task=distill teacher_ckpt=<gpt or var run>`` (configs/distill/default.yaml) runs ``prepare_distill``:

1. Pairs. ``build_pairs`` draws eps (N, L, d) ~ N(0, I) and labels (balanced over classes) and maps them through
   the teacher alone (``decoding.distilled.teacher_map_of(teacher)``: the flow map chained over the KV cache,
   token by token for a GPT, scale by scale for a VAR (``var_teacher_map``); no training
   images). Chunks of ``chunk_size`` pairs are written atomically as safetensors under
   ``<data_dir>/dd_pairs/<key>/``; chunk k is drawn from its own seed, so a killed build resumes at the first
   missing chunk and a larger num_pairs extends the same pairs. ``key`` hashes the teacher run's files
   (model.safetensors + config.yaml), the sampling settings, the flow solver and the seed: a changed teacher
   or setting is another folder (rebuilt, never reused).
2. The student (the per-kind adapter ``student_of_kind``: ``DistilledGPT`` below, or ``DistilledVAR`` of
   generators/distill_var.py for a VAR teacher, whose splits are scale indices; both share ``DistilledStudent``'s
   noise, inputs, step and loss). ``DistilledGPT`` (kind ``dd_gpt``): the teacher's GPT (weights copied from the teacher) driven
   by input embeddings. Alignment with GPT's [class, ...] layout (L tokens, width D, code dim d):

       x           (B, L, d)    x_j = eps_j (noise) or c_{token_j} (data) for j < t
       embeds      (B, L, D)    in_proj(x_j) + type_embed[j < t]
       GPT input   (B, L+1, D)  [class, embeds_0 .. embeds_{L-1}]; slot j+1 has RoPE of grid position j
       logits      (B, L+1, V)  causal; slot j+1 has seen class, x_0..x_j
       used        (B, L, V)    logits[:, 1:]: slot j+1 predicts token j

   One slot later than the teacher (whose slot j predicts token j from tokens < j): token j depends on eps_j
   itself, and causal attention gives slot j+1 exactly eps_<=j, which is all token j depends on.
   in_proj is initialised by least squares so that in_proj(c_v) ~ the teacher's token embedding of v.
3. Loss: for every training split t (distill.splits, e.g. [0, L/2]) the input X_t = (codes of the pair's first
   t tokens, its noise after) and cross-entropy against the pair's tokens at positions >= t (the positions this
   step decides), averaged over splits. Accuracy: the fraction of those tokens predicted exactly.
4. ``DistillModule`` is GeneratorModule (AdamW, warmup-cosine, EMA, exact resume) on the pair batches, with
   grids sampled by ``decoding=distilled``. The run exports like a generator run (kind ``distill``):
   config.yaml records the teacher run, its hash, the pairs and the settings; sample.py loads it with the
   teacher's tokenizer (``utils.runs.load_generator``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from data.token_cache import TokenDataModule
from utils.runs import run_hash
from decoding.distilled import TEACHER_MAPS, code_vectors, teacher_map_of
from decoding.flow_map import flow_sigma_range
from decoding.sampling import SamplingConfig
from generators.gpt import GPT
from generators.module import (
    GeneratorModule,
    sampling_config,
)
from utils.checkpoint import CheckpointError, atomic_replace

log = logging.getLogger("tokar")


#################################################################################
#                                   The student                                 #
#################################################################################

class DistilledStudent(nn.Module):
    """What every DD1 student shares: noise, the inputs X_t, one step, the loss over its splits (kind-free)."""

    def _setup_inputs(self, codes: torch.Tensor, width: int, splits, sigmas) -> None:
        """The code vectors (a buffer), the flow map's sigmas, in_proj = Linear(d -> width) and the noise/data embedding."""
        self.splits = tuple(sorted(int(s) for s in splits))
        self.register_buffer("codes", codes.float().clone())  # (V, d): part of the run, so sampling needs no lookup
        self.sigmas = tuple(sigmas) if sigmas else flow_sigma_range(codes)  # the teacher map's time grid (teacher_from)
        self.in_proj = nn.Linear(codes.shape[1], width)
        self.type_embed = nn.Embedding(2, width)  # 0 = noise, 1 = data (a code vector)
        nn.init.normal_(self.type_embed.weight, std=0.02)

    @property
    def noise_dim(self) -> int:
        return self.codes.shape[1]

    def noise_scale(self) -> float | torch.Tensor:
        """The factor on eps in the student's input (1: the noise as drawn)."""
        return 1.0

    def noise(self, batch: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """eps (B, L, d) ~ N(0, I)."""
        return torch.randn(batch, self.num_tokens, self.noise_dim, generator=generator, device=device)

    def inputs(self, eps: torch.Tensor, tokens: torch.Tensor | None, split: int) -> tuple[torch.Tensor, torch.Tensor]:
        """X_split: (x (B, L, d) = codes of tokens[:, :t] then eps[:, t:], is_data (L,) bool), t = position(split)."""
        t = self.position(split)
        is_data = torch.arange(eps.shape[1], device=eps.device) < t  # (L,)
        x = eps.float() * self.noise_scale()
        if t:
            x = torch.cat([self.codes[tokens[:, :t]], x[:, t:]], 1)  # (B, L, d)
        return x, is_data

    @torch.no_grad()
    def predict(self, eps: torch.Tensor, tokens: torch.Tensor | None, split: int, cond: torch.Tensor) -> torch.Tensor:
        """One student step from X_split -> tokens (B, L): tokens[:, :t] kept, the rest the argmax."""
        logits = self(*self.inputs(eps, tokens, split), cond)
        out = logits.argmax(-1)
        t = self.position(split)
        if t:
            out[:, :t] = tokens[:, :t]
        return out

    def loss(self, pairs, labels: torch.Tensor, tokenizer=None, objective=None):
        """pairs = (eps (B, L, d), tokens (B, L)) -> (cross-entropy over every split's decided positions, accuracy)."""
        eps, tokens = pairs
        tokens = tokens.long()
        total, correct, count = 0.0, 0, 0
        for split in self.splits:
            t = self.position(split)
            logits = self(*self.inputs(eps, tokens, split), labels)[:, t:]  # (B, L-t, V)
            target = tokens[:, t:]
            total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
            correct += int((logits.argmax(-1) == target).sum())
            count += target.numel()
        return total / len(self.splits), torch.tensor(correct / count)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, sampling: SamplingConfig | None = None, generator=None, tokenizer=None,
               **_) -> torch.Tensor:
        """One-step sampling: tokens (B, L)."""
        return self.predict(self.noise(cond.shape[0], generator, cond.device), None, 0, cond)


class DistilledGPT(DistilledStudent):
    """A GPT that maps (noise or code vectors, class) to all L tokens in one forward (DD1's student)."""

    kind = "dd_gpt"
    layout = "raster"
    tokens_to_images = staticmethod(GPT.tokens_to_images)
    describe_sampling = staticmethod(GPT.describe_sampling)

    def __init__(self, gpt: GPT, codes: torch.Tensor, splits, sigmas: tuple[float, float] | None = None):
        super().__init__()
        self.gpt = gpt
        self._setup_inputs(codes, gpt.dim, splits, sigmas)
        if not self.splits or min(self.splits) < 0 or max(self.splits) >= gpt.block_size or self.splits[0] != 0:
            raise ValueError(f"distill.splits={list(splits)}: need 0 first and every split in 0..{gpt.block_size - 1}")

    @property
    def num_tokens(self) -> int:
        """Tokens per generated sequence."""
        return self.gpt.block_size

    @staticmethod
    def resolve_splits(splits, teacher) -> list[int]:
        """distill.splits -> token positions: an int as given, a float that fraction of L (0.5 -> L/2)."""
        L = teacher.num_tokens
        return sorted({round(s * L) if isinstance(s, float) else int(s) for s in splits})

    def position(self, split: int) -> int:
        """Tokens decided before a split (a GPT student counts splits in tokens)."""
        return int(split)

    def forward_counter(self):
        """Counts student forward passes (calls of the block stack)."""
        return self.gpt.forward_counter()

    @torch.no_grad()
    def init_from_teacher(self, teacher: GPT) -> None:
        """Copy the teacher's weights; in_proj by least squares so in_proj(c_v) ~ the teacher's embedding of v."""
        self.gpt.load_state_dict(teacher.state_dict())
        A = torch.cat([self.codes, torch.ones_like(self.codes[:, :1])], 1).double()  # (V, d+1)
        sol = torch.linalg.lstsq(A, teacher.tok_embed.weight.double()).solution  # (d+1, D)
        self.in_proj.weight.copy_(sol[:-1].T.float())
        self.in_proj.bias.copy_(sol[-1].float())

    def forward(self, x: torch.Tensor, is_data: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, L, d), is_data (L,) or (B, L) bool, cond (B,) -> logits (B, L, V); logits[:, j] predicts token j."""
        embeds = self.in_proj(x) + self.type_embed(is_data.long())  # (B, L, D)
        return self.gpt(None, cond, embeds=embeds, drop_labels=False)[:, 1:]  # (B, L+1, V) -> (B, L, V)


def student_of_kind(kind: str):
    """(student class, its builder's import path) for a teacher kind: the per-kind adapter of task=distill."""
    if kind == "var":
        from generators.distill_var import DistilledVAR

        return DistilledVAR, "generators.distill_var.build_var_student"
    if kind == "gpt":
        return DistilledGPT, "generators.distill_student.build_student"
    raise ValueError(f"task=distill distils a GPT or VAR teacher, not a {kind!r} generator")


def build_student(teacher_target: str, teacher_model: dict, noise_dim: int, splits, sigmas, student=None,
                  **model_args) -> DistilledStudent:
    """The student from a distill run's config (the teacher's generator.model node, its _target_ apart so Hydra does
    not build it first, + model_args); its code vectors are a buffer, filled from the weights file (or by
    ``prepare_distill``). student: the student class (default DistilledGPT)."""
    net = instantiate({"_target_": teacher_target, **teacher_model}, _convert_="all", **model_args)
    return (student or DistilledGPT)(net, torch.zeros(net.vocab_size, noise_dim), splits, tuple(sigmas))


#################################################################################
#                                   The pairs                                   #
#################################################################################

def teacher_hash(path) -> str:
    """sha256 of a teacher run: its model.safetensors + config.yaml (a finished run), else of the .ckpt file itself."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "model.safetensors").exists():
        return run_hash(p)  # the same file hash as tokenizer runs
    if p.name == "model.safetensors":
        return run_hash(p.parent)
    ckpt = p / "checkpoints" / "last.ckpt" if p.is_dir() else p
    if ckpt.suffix != ".ckpt" or not ckpt.exists():
        raise CheckpointError(f"teacher_ckpt={path}: pass a GPT or VAR run folder (model.safetensors + config.yaml) or a .ckpt")
    h = hashlib.sha256()
    with open(ckpt, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_teacher(path, device, expected_hash: str | None = None, tokenizer_path: str | None = None):
    """(teacher GPT or VAR in eval mode, tokenizer, config, hash) from a generator run folder or .ckpt; hash-checked if given.

    tokenizer_path: the teacher's tokenizer run if it moved (its hash must still match); None = the recorded path."""
    from utils.runs import load_generator

    digest = teacher_hash(path)
    if expected_hash is not None and digest != expected_hash:
        raise CheckpointError(f"the teacher run {path} changed since the student was distilled from it (hash "
                              f"{expected_hash[:12]}, now {digest[:12]}); restore it or distil again")
    teacher, tokenizer, config = load_generator(path, device, tokenizer_path)
    if getattr(teacher, "kind", None) not in TEACHER_MAPS:
        raise ValueError(f"teacher_ckpt={path} is a {getattr(teacher, 'kind', '?')} run; task=distill distils a "
                         f"{' or '.join(TEACHER_MAPS)}")
    return teacher.requires_grad_(False), tokenizer, config, digest


def pairs_key(teacher_hash: str, sampling: SamplingConfig, flow: dict, num_classes: int, seed: int,
              chunk_size: int) -> str:
    """The pairs folder's name: a hash of everything the pairs depend on (not their number)."""
    blob = json.dumps({"teacher": teacher_hash, "sampling": vars(sampling), "flow": flow, "classes": num_classes,
                       "seed": seed, "chunk": chunk_size}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@torch.no_grad()
def generate_chunk(teacher, codes, sigmas, sampling: SamplingConfig, flow: dict, labels: torch.Tensor, seed: int,
                   batch_size: int, tokenizer=None) -> dict:
    """One chunk of pairs: labels (n,) -> {eps (n, L, d) float32, tokens (n, L) int32, labels (n,) int64}.

    The teacher's map by its kind (``teacher_map_of``: GPT token by token, VAR scale by scale; a VAR needs its
    msvq ``tokenizer``)."""
    device = codes.device
    g = torch.Generator(device="cpu").manual_seed(seed)
    eps = torch.randn(labels.shape[0], teacher.num_tokens, codes.shape[1], generator=g)  # drawn on CPU: any device
    tmap, tokens = teacher_map_of(teacher), []
    for i in range(0, labels.shape[0], batch_size):
        tokens.append(tmap(teacher, labels[i:i + batch_size].to(device), eps[i:i + batch_size].to(device),
                           sampling, codes, sigmas, flow_steps=flow["steps"], solver=flow["solver"],
                           tokenizer=tokenizer).cpu())
    return {"eps": eps.contiguous(), "tokens": torch.cat(tokens).int(), "labels": labels.long()}


def build_pairs(teacher, teacher_hash: str, codes: torch.Tensor, sampling: SamplingConfig, flow: dict,
                num_classes: int, num_pairs: int, root, seed: int = 0, chunk_size: int = 1024,
                batch_size: int = 256, sigmas=None, tokenizer=None) -> Path:
    """The pairs folder for these settings with at least num_pairs pairs; builds only the missing chunks."""
    folder = Path(root) / pairs_key(teacher_hash, sampling, flow, num_classes, seed, chunk_size)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"teacher_hash": teacher_hash, "sampling": vars(sampling), "flow": flow, "num_classes": num_classes,
            "seed": seed, "chunk_size": chunk_size, "block_size": teacher.num_tokens, "noise_dim": codes.shape[1]}
    atomic_replace(lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)), folder / "meta.json")
    sigmas = sigmas or flow_sigma_range(codes)
    codes = codes.to(next(teacher.parameters()).device)
    for k in range((num_pairs + chunk_size - 1) // chunk_size):
        path = folder / f"chunk_{k:05d}.safetensors"
        if path.exists():
            continue
        start = time.perf_counter()
        labels = torch.arange(k * chunk_size, (k + 1) * chunk_size) % num_classes
        chunk = generate_chunk(teacher, codes, sigmas, sampling, flow, labels, seed * 1_000_003 + k, batch_size,
                               tokenizer)
        info = {"seconds": f"{time.perf_counter() - start:.3f}"}
        atomic_replace(lambda tmp, c=chunk, m=info: save_file(c, tmp, metadata=m), path)
        log.info("pairs: chunk %d (%d pairs) -> %s", k, chunk_size, path)
    return folder


def pairs_seconds(folder, num_pairs: int) -> float:
    """The wall time spent building the chunks that hold the first num_pairs pairs (from their metadata)."""
    from safetensors import safe_open

    meta = json.loads((Path(folder) / "meta.json").read_text())
    total = 0.0
    for k in range((num_pairs + meta["chunk_size"] - 1) // meta["chunk_size"]):
        with safe_open(str(Path(folder) / f"chunk_{k:05d}.safetensors"), "pt") as f:
            total += float((f.metadata() or {}).get("seconds", "nan"))
    return total


def load_pairs(folder, num_pairs: int) -> dict:
    """The first num_pairs pairs of a pairs folder: {eps, tokens, labels}."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    n_chunks = (num_pairs + meta["chunk_size"] - 1) // meta["chunk_size"]
    chunks = [load_file(str(folder / f"chunk_{k:05d}.safetensors")) for k in range(n_chunks)]
    return {key: torch.cat([c[key] for c in chunks])[:num_pairs] for key in ("eps", "tokens", "labels")}


class PairDataset(Dataset):
    """((eps, tokens), label) items of a slice of the pairs."""

    def __init__(self, pairs: dict, start: int, stop: int):
        self.eps, self.tokens = pairs["eps"][start:stop], pairs["tokens"][start:stop]
        self.labels = pairs["labels"][start:stop]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int):
        return (self.eps[i], self.tokens[i]), self.labels[i]


class PairDataModule(TokenDataModule):
    """TokenDataModule's resumable loaders over the pairs: the last val_pairs are held out (split "val")."""

    def __init__(self, folder, num_pairs: int, val_pairs: int, **kw):
        super().__init__({"train": folder, "val": folder}, val_split="val", test_split="val", **kw)
        self.pairs = load_pairs(folder, num_pairs)
        self.num_pairs, self.val_pairs = num_pairs, val_pairs

    def split(self, split: str) -> Dataset:
        cut = self.num_pairs - self.val_pairs
        return PairDataset(self.pairs, 0, cut) if split == "train" else PairDataset(self.pairs, cut, self.num_pairs)


#################################################################################
#                                   The system                                  #
#################################################################################

class DistillModule(GeneratorModule):
    """GeneratorModule training a DistilledGPT on the teacher's pairs; grids and FID through decoding=distilled."""

    decoder = "distilled"


def check_same_teacher(ckpt_path, config: dict) -> None:
    """A resumed distill checkpoint must come from the same teacher (hash), pairs and splits."""
    old = (torch.load(ckpt_path, map_location="cpu", weights_only=True).get("hyper_parameters", {})
           .get("config", {}).get("distill") or {})
    new = config["distill"]
    diff = [k for k in ("teacher", "pairs", "splits", "flow", "sampling") if old.get(k) != new.get(k)]
    if diff:
        raise CheckpointError(f"{ckpt_path} was distilled with other {', '.join('distill.' + k for k in diff)} "
                              f"(teacher hash {str((old.get('teacher') or {}).get('hash'))[:12]}, now "
                              f"{new['teacher']['hash'][:12]}); resume with the run's own settings and teacher")


def prepare_distill(cfg, out: Path, device, total_steps_of):
    """(datamodule, config, module) of task=distill: load the teacher, build the pairs, the student from the teacher."""
    from omegaconf import OmegaConf

    if not cfg.get("teacher_ckpt"):
        raise ValueError("task=distill needs the GPT or VAR it distils: teacher_ckpt=<generator run folder> "
                         "(outputs/generator/<time>, from python train.py task=generator generator=gpt|var ...)")
    d = OmegaConf.to_container(cfg.distill, resolve=True)
    teacher, tokenizer, tconfig, thash = load_teacher(cfg.teacher_ckpt, device)
    student_cls, builder = student_of_kind(teacher.kind)
    splits = student_cls.resolve_splits(d["splits"], teacher)  # GPT: tokens (0.5 -> L/2), VAR: scale indices
    sampling = sampling_config(tconfig["generator"]["sampling"], d["sampling"])
    codes = code_vectors(tokenizer).to(device)  # (V, d)
    sigmas = flow_sigma_range(codes)
    flow = {"steps": int(d["flow_steps"]), "solver": d["flow_solver"]}
    num_pairs, val_pairs = int(d["num_pairs"]), int(d["val_pairs"])
    if not 0 < val_pairs < num_pairs:
        raise ValueError(f"distill.val_pairs={val_pairs} must lie in 1..distill.num_pairs-1 ({num_pairs - 1})")
    folder = build_pairs(teacher, thash, codes, sampling, flow, tconfig["data"]["num_classes"], num_pairs,
                         Path(cfg.paths.data_dir) / "dd_pairs", int(d["seed"]), int(d["chunk_size"]),
                         int(d["pairs_batch_size"]), sigmas, tokenizer)
    datamodule = PairDataModule(folder, num_pairs, val_pairs, batch_size=int(d["batch_size"]),
                                eval_batch_size=int(d["batch_size"]), num_workers=0, seed=int(d["seed"]))
    gen = {"name": student_cls.kind, "model": {"_target_": builder,
                                       "teacher_target": tconfig["generator"]["model"]["_target_"],
                                       "teacher_model": {k: v for k, v in tconfig["generator"]["model"].items()
                                                         if k != "_target_"}, "noise_dim": codes.shape[1],
                                       "splits": splits, "sigmas": list(sigmas)},
           "sampling": vars(sampling), "optimizer": d["optimizer"], "ema_decay": d["ema_decay"],
           "grad_clip": d["grad_clip"], "eval": d["eval"]}
    config = {"kind": "distill", "generator": gen, "data": tconfig["data"], "tokenizer": tconfig["tokenizer"],
              "tokens": tconfig["tokens"], "model_args": tconfig["model_args"],
              "distill": {"teacher": {"path": str(Path(cfg.teacher_ckpt).expanduser().resolve()), "hash": thash,
                                      "name": tconfig["generator"]["name"]},
                          "pairs": {"folder": str(folder), "num_pairs": num_pairs, "val_pairs": val_pairs},
                          "flow": flow, "splits": splits, "sampling": vars(sampling)},
              "total_steps": int(total_steps_of(cfg, datamodule))}
    if cfg.get("ckpt_path"):
        check_same_teacher(cfg.ckpt_path, config)
    module = DistillModule(config, output_dir=str(out), tokenizer=tokenizer)
    module.model.codes.copy_(codes)
    if not cfg.get("ckpt_path"):
        module.model.init_from_teacher(teacher)
        module.ema.shadow.load_state_dict(module.model.state_dict())
    log.info("distilling %s (hash %s) from %d pairs in %s, splits %s", cfg.teacher_ckpt, thash[:12], num_pairs,
             folder, splits)
    return datamodule, config, module
