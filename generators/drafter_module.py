"""task=drafter: trains an EAGLE draft head (generators/draft_head.py) for one frozen GPT run.

The drafter run records its generator run (path and the sha256 of its weights); ``load_drafter`` /
``check_drafter_pairing`` refuse a drafter with any other generator, naming both. Data: the generator's token
cache (``drafter.data=cache``: teacher-forced features of real token sequences) or sequences the target samples
itself (``drafter.data=self``: generated once into <run>/self_data in seeded chunks, resumable, then merged
into one token-cache file). Resume, atomic checkpoints and the safetensors export are train.py's, as for
every task; the EMA of the head is what is exported.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file, save_file

from generators.draft_head import DraftHead, drafter_loss
from utils.checkpoint import CheckpointError, atomic_replace
from utils.runs import check_kind, load_generator, read_checkpoint
from utils.ema import EMA
from utils.resume import ExactResumeMixin

log = logging.getLogger(__name__)


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 of a network's state dict (names, dtypes, shapes and bytes): which generator a drafter is for."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_drafter_pairing(drafter_config: dict, generator_hash: str, drafter_path, generator_desc: str) -> None:
    """A CheckpointError unless the drafter was trained for this generator (by weights hash)."""
    rec = drafter_config.get("generator_run") or {}
    if rec.get("hash") != generator_hash:
        raise CheckpointError(f"the drafter {drafter_path} was trained for the generator {rec.get('path')} (weights "
                              f"{str(rec.get('hash'))[:12]}), not for {generator_desc} (weights {generator_hash[:12]}); "
                              f"train one with: python train.py task=drafter generator_ckpt=<that generator run>")


def load_drafter(path, generator: torch.nn.Module, device, generator_desc: str = "this generator") -> DraftHead:
    """The drafter run's EMA head (eval mode) after checking it belongs to ``generator``."""
    config, state, _, _ = read_checkpoint(path)
    check_kind(config, "drafter", path)
    check_drafter_pairing(config, weights_hash(generator), path, generator_desc)
    head = DraftHead(**config["model_args"])
    head.load_state_dict(state)
    return head.to(device).eval()


def self_data(target, out: Path, num: int, chunk: int, num_classes: int, sampling, seed: int, device) -> Path:
    """Sample ``num`` sequences from the target (uniform labels) into out/chunk_*.safetensors, one seeded chunk at
    a time (a killed run redoes only its unfinished chunk), then merge into out/train.safetensors."""
    merged = out / "train.safetensors"
    if merged.is_file():
        return merged
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, start in enumerate(range(0, num, chunk)):
        path = out / f"chunk_{i:05d}.safetensors"
        if not path.is_file():
            g = torch.Generator(device).manual_seed(seed + i)
            n = min(chunk, num - start)
            labels = torch.randint(0, num_classes, (n,), generator=g, device=device)
            codes = target.sample(labels, sampling, g)  # (n, L)
            atomic_replace(lambda tmp, c=codes, y=labels: save_file({"codes": c.cpu().int(), "labels": y.cpu()}, tmp), path)
            log.info("self-distillation data: chunk %d (%d sequences) -> %s", i, n, path)
        parts.append(load_file(str(path)))
    tensors = {k: torch.cat([p[k] for p in parts]) for k in ("codes", "labels")}
    meta = {"num_classes": str(num_classes), "layout": "raster", "source": "self"}
    atomic_replace(lambda tmp: save_file(tensors, tmp, metadata=meta), merged)
    return merged


class DrafterModule(ExactResumeMixin, L.LightningModule):
    """Trains a draft head on a frozen GPT's features; exports the head's EMA."""

    def __init__(self, config: dict, output_dir: str | None = None, target: torch.nn.Module | None = None):
        """config: {"kind": "drafter", "drafter": <drafter node>, "generator_run": {path, hash}, "data": {...},
        "model_args": DraftHead arguments, "total_steps": int}. target: the frozen GPT (else loaded, hash-checked)."""
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.config, self.run_config, self.output_dir = config["drafter"], config, output_dir
        self.model = DraftHead(**config["model_args"])
        self.ema = EMA(self.model, self.config["ema_decay"])
        self._target: list = [target] if target is not None else []  # frozen, not a submodule
        self.batches_seen, self._resume_rng, self.last_grid = 0, None, None

    @property
    def target(self) -> torch.nn.Module:
        if not self._target:
            rec = self.run_config["generator_run"]
            gen, _, _ = load_generator(rec["path"], self.device)
            check_drafter_pairing(self.run_config, weights_hash(gen), "this drafter run", rec["path"])
            self._target.append(gen)
        t = self._target[0]
        for p in t.parameters():
            p.requires_grad_(False)
        return t.to(self.device).eval()

    def _loss(self, head, codes, labels, train: bool):
        c = self.config
        return drafter_loss(head, self.target, codes.long(), labels, noise_std=c["noise_std"] if train else 0.0,
                            ce_weight=c["ce_weight"], null_prob=c["null_prob"] if train else 0.0)

    def configure_optimizers(self):
        o = self.config["optimizer"]
        return torch.optim.AdamW(self.model.parameters(), lr=o["lr"], betas=tuple(o["betas"]),
                                 weight_decay=o["weight_decay"])

    def training_step(self, batch, batch_idx):
        codes, labels = batch
        loss, parts = self._loss(self.model, codes, labels, True)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite drafter loss at step {self.global_step}; lower drafter.optimizer.lr")
        self.batches_seen += 1
        self.log_dict({"train/loss": loss, "train/feature_loss": parts["feature_loss"], "train/ce": parts["ce"]},
                      batch_size=labels.shape[0])
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.model)

    def validation_step(self, batch, batch_idx):
        codes, labels = batch
        loss, parts = self._loss(self.ema.shadow, codes, labels, False)
        self.log("val/loss", loss, sync_dist=True, batch_size=labels.shape[0])
        self.log("val/ce", parts["ce"], sync_dist=True, batch_size=labels.shape[0])


def prepare_drafter_task(cfg, out: Path):
    """(datamodule, config, model) of task=drafter: load the GPT run, pick the data, record the pairing."""
    from omegaconf import OmegaConf

    from data.token_cache import TokenDataModule
    from generators.module import sampling_config

    if not cfg.get("generator_ckpt"):
        raise ValueError("task=drafter needs the GPT it drafts for: generator_ckpt=<generator run folder> "
                         "(outputs/generator/<time>, from python train.py task=generator generator=gpt)")
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
                          else "cpu")
    target, _, gconfig = load_generator(cfg.generator_ckpt, device)
    if gconfig["generator"]["name"] != "gpt":
        raise ValueError(f"task=drafter trains a draft head for a raster GPT; {cfg.generator_ckpt} is a "
                         f"{gconfig['generator']['name']} run")
    dcfg = OmegaConf.to_container(cfg.drafter, resolve=True)
    caches = dict(gconfig["tokens"]["cache"])
    val_split = cfg.data.val_split if cfg.data.val_split in caches else next(iter(caches))
    if dcfg["data"] == "self":
        s = sampling_config(gconfig["generator"]["sampling"], dcfg.get("sampling") or {})
        caches["train"] = self_data(target, out / "self_data", int(dcfg["self_samples"]), int(dcfg["self_chunk"]),
                                    int(gconfig["data"]["num_classes"]), s, int(cfg.seed or 0), device)
    elif dcfg["data"] != "cache":
        raise ValueError(f"drafter.data={dcfg['data']!r}; choose cache (the generator's token cache) or self "
                         "(sequences the generator samples)")
    for split in ("train", val_split):
        if not Path(caches[split]).is_file():
            raise FileNotFoundError(f"the generator's token cache {caches[split]} is missing; rebuild it by training "
                                    "the generator's data step again or use drafter.data=self")
    datamodule = TokenDataModule({"train": caches["train"], val_split: caches[val_split]},
                                 batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
                                 num_workers=cfg.data.num_workers, val_split=val_split, test_split=val_split,
                                 seed=cfg.data.seed)
    attn = target.blocks[0].attn
    config = {"kind": "drafter", "drafter": dcfg, "data": gconfig["data"], "tokenizer": gconfig.get("tokenizer"),
              "generator_run": {"path": str(Path(cfg.generator_ckpt).resolve()), "hash": weights_hash(target)},
              "model_args": {"dim": target.dim, "heads": attn.heads, "kv_heads": attn.kv_heads},
              "total_steps": int(cfg.trainer.max_steps)}
    if cfg.get("ckpt_path"):
        old, _, _, _ = read_checkpoint(cfg.ckpt_path)
        check_kind(old, "drafter", cfg.ckpt_path)
        check_drafter_pairing(old, config["generator_run"]["hash"], cfg.ckpt_path, cfg.generator_ckpt)
    return datamodule, config, DrafterModule(config, output_dir=str(out), target=target)
