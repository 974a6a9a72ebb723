"""The generator LightningModule: a thin system around a plain GPT / VAR / FlowAR network.

It trains on token caches (data/token_cache.py): teacher-forced cross-entropy for GPT (raster codes) and
VAR (next-scale codes, inputs from the frozen msvq), flow matching for FlowAR (scaled kl latents). AdamW
(beta = 0.9, 0.95, decay on matrices only), warmup + cosine, gradient clipping, an EMA of the weights that
evaluation, sample grids and the export use, bf16 autocast on CUDA only. Label dropout for classifier-free
guidance happens inside the networks' class embedding (``ClassEmbedding``).

The tokenizer is frozen and held in a plain list, so it is no submodule: not in the state_dict, the .ckpt,
model.safetensors or any optimizer. A generator's config names the tokenizer run and its hash;
``utils.runs.load_run`` refuses a tokenizer that changed or is missing.

Also here, shared by train.py and sample.py: pairing checks, building a network from its config, turning
sampled tokens into images, and the FID of a generator.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from torchvision.utils import save_image

from decoding.registry import get_decoder
from decoding.sampling import SamplingConfig
from utils.ema import EMA
from utils.grids import label_rows
from utils.progress import progress
from utils.resume import ExactResumeMixin
from utils.schedule import warmup_cosine
from utils.timing import synchronize

log = logging.getLogger("tokar")



#################################################################################
#                      Pairing, model arguments, building                       #
#################################################################################

def generator_class(name: str):
    """The network class of a generator name (generator=<name>): GPT, VAR or FlowAR."""
    from generators.distill_student import DistilledGPT
    from generators.distill_var import DistilledVAR
    from generators.flowar import FlowAR
    from generators.gpt import GPT
    from generators.var import VAR

    classes = {cls.kind: cls for cls in (GPT, VAR, FlowAR, DistilledGPT, DistilledVAR)}
    if name not in classes:
        raise ValueError(f"unknown generator {name!r}; one of {', '.join(classes)}")
    return classes[name]


def check_pairing(generator: str, quantizer, tokenizer_path) -> None:
    """A ValueError unless the tokenizer's quantizer suits the generator (VAR: msvq, FlowAR: kl, GPT: discrete)."""
    generator_class(generator).check_tokenizer(quantizer, tokenizer_path)


def model_args(generator: str, tokenizer, image_size: int, num_classes: int, model_cfg: dict) -> dict:
    """The constructor arguments that come from the tokenizer and the data (nanoGPT's model_args)."""
    return generator_class(generator).model_args(tokenizer, image_size, num_classes, model_cfg)


def build_objective(model, config: dict):
    """The TokenObjective of a run's generator.train_scales / generator.distill, or None for the plain loss.

    The teacher (distill.teacher, a generator run on the same tokenizer and data) is loaded frozen, in eval
    mode, and kept out of the module's parameters and state_dict.
    """
    from generators.objective import TokenObjective
    from utils.runs import check_same_tokenizer, load_generator

    gen = config["generator"]
    scales, distill = gen.get("train_scales"), gen.get("distill") or {}
    if distill.get("required") and not distill.get("teacher"):
        raise ValueError("this experiment distils from a teacher: pass generator.distill.teacher=<the large generator "
                         "run> (same tokenizer and data)")
    if scales is None and not distill.get("teacher"):
        return None
    if scales is not None and not hasattr(model, "scale_positions"):
        raise ValueError(f"generator.train_scales applies to VAR (scale indices); {gen['name']} has no scales")
    objective = TokenObjective(positions=model.scale_positions(scales) if scales is not None else None)
    if distill.get("teacher"):
        teacher, _, tconfig = load_generator(distill["teacher"], "cpu")
        check_same_tokenizer(config, tconfig, "the distillation teacher", "this run", distill["teacher"])
        if tconfig["generator"]["name"] != gen["name"]:
            raise ValueError(f"distill.teacher {distill['teacher']} is a {tconfig['generator']['name']} run; a "
                             f"{gen['name']} student needs a {gen['name']} teacher")
        for p in teacher.parameters():
            p.requires_grad_(False)
        objective.teacher = teacher
        objective.temperature = float(distill.get("temperature", 1.0))
        objective.kl_weight = float(distill.get("kl_weight", 1.0))
        objective.ce_weight = float(distill.get("ce_weight", 0.0))
    return objective


def build_generator(config: dict) -> torch.nn.Module:
    """The network from a generator run config: generator.model (with _target_) + model_args."""
    return instantiate(config["generator"]["model"], _convert_="all", **config["model_args"])


#################################################################################
#                           Tokens <-> images                                   #
#################################################################################

@torch.no_grad()
def decode_tokens(model, tokenizer, tokens, info: dict) -> torch.Tensor:
    """Sampled tokens in ``model``'s layout -> images (B, C, H, W) in [-1, 1] (fp32, autocast off)."""
    device_type = (tokens[0] if isinstance(tokens, (list, tuple)) else tokens).device.type
    with torch.autocast(device_type=device_type, enabled=False):
        images = model.tokens_to_images(tokenizer, tokens, info)
    return images.float().clamp(-1, 1)


def sampling_config(defaults: dict, overrides: dict | None = None) -> SamplingConfig:
    """The generator's sampling defaults with every non-null override on top."""
    merged = dict(defaults or {})
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return SamplingConfig.from_any(merged)


@torch.no_grad()
def sample_images(model, tokenizer, labels: torch.Tensor, sampling: SamplingConfig, info: dict,
                  generator: torch.Generator | None = None, decoder=None, settings=None) -> tuple[torch.Tensor, dict]:
    """Sample with a decoding method (default ``ar``) and decode -> (images (B, C, H, W), stats + seconds).

    ``info`` is a generator config's "tokens" node (layout, token_shape, scale_factor). The two timings are
    synchronized on CUDA so they can be added or reported apart.
    """
    decoder = get_decoder(decoder or "ar") if not hasattr(decoder, "run") else decoder
    tokens, stats = decoder.run(model, labels, sampling, generator, tokenizer, settings)  # synchronized inside
    t0 = time.perf_counter()
    images = decode_tokens(model, tokenizer, tokens, info)
    synchronize(labels.device)
    stats = dict(stats, generate_seconds=stats["wall_time"], decode_seconds=time.perf_counter() - t0)
    return images, stats


def describe_sampling(s: SamplingConfig, config: dict) -> str:
    """The sampling settings that matter for a run's generator, in one line (the generator class says which)."""
    return generator_class(config["generator"]["name"]).describe_sampling(s)


def class_grid_labels(num_classes: int, per_class: int, max_classes: int | None = None) -> torch.Tensor:
    """Labels of a grid with one row per class: (rows * per_class,) as 0,0,..,1,1,.."""
    rows = min(num_classes, max_classes) if max_classes else num_classes
    return torch.arange(rows).repeat_interleave(per_class)


def save_class_grid(images: torch.Tensor, per_class: int, path: str | Path, row_names: list | None = None) -> Path:
    """Save images ordered class by class as a grid with one row per class and ``per_class`` columns; row_names
    (e.g. the rows' class names) are written beside the rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.float().cpu(), path, nrow=per_class, normalize=True, value_range=(-1, 1), padding=1,
               pad_value=0.5)
    return label_rows(path, row_names) if row_names else path


def class_names(data: dict, classes) -> list[str]:
    """The names of class ids `classes` in a run's data config (its `class_names`, else the ids themselves)."""
    names = data.get("class_names") or []
    return [f"{k} {names[k]}" if k < len(names) else str(k) for k in map(int, classes)]


#################################################################################
#                                   FID                                         #
#################################################################################

def make_fid(data: dict, split: str, reference_images: int | None, device) -> tuple[object, str]:
    """An FID metric holding the cached reference statistics of ``data``'s split -> (metric, "name:split")."""
    from evaluation.fid import FID, reference_statistics

    stats = reference_statistics(data["name"], split, data["image_size"], reference_images,
                                 settings=data.get("settings"))
    fid = FID(device=device)
    fid.set_real_statistics(stats.mu, stats.sigma, stats.n)
    fid.num_real = stats.n
    return fid, f"{data['name']}:{split}"


@torch.no_grad()
def generator_fid(model, tokenizer, config: dict, num_samples: int, sampling: SamplingConfig, batch_size: int,
                  seed: int, device, split: str = "test", reference_images: int | None = None, rank: int = 0,
                  world_size: int = 1, save_dir: str | Path | None = None, decoder=None, settings=None) -> dict:
    """FID of ``num_samples`` samples balanced over classes against the reference statistics of ``split``.

    Rank r of ``world_size`` samples labels r, r + world, ... seeded ``seed * world + rank``; the FID states
    are summed over ranks in ``compute`` (every rank must call this). ``save_dir``: also write PNGs.
    decoder / settings: the decoding method (a name or registry entry; default ``ar``) and its settings.
    """
    from evaluation.fid import protocol_label

    data = config["data"]
    fid, real = make_fid(data, split, reference_images, device)
    labels = (torch.arange(num_samples) % max(1, data["num_classes"]))[rank::world_size]
    g = torch.Generator(device=device).manual_seed(seed * world_size + rank)
    decoder = get_decoder(decoder or "ar") if not hasattr(decoder, "run") else decoder
    settings = decoder.parse_settings(settings)
    seconds = 0.0
    for i in progress(range(0, labels.shape[0], batch_size), f"sampling {labels.shape[0]} images for FID"):
        y = labels[i:i + batch_size].to(device)
        images, stats = sample_images(model, tokenizer, y, sampling, config["tokens"], g, decoder, settings)
        seconds += stats["generate_seconds"] + stats["decode_seconds"]
        fid.update(images, real=False)
        if save_dir is not None:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            for j, (img, lab) in enumerate(zip(images, y.tolist())):
                index = rank + world_size * (i + j)  # the global sample number
                save_image(img.float().cpu(), Path(save_dir) / f"{index:06d}_class{lab}.png", normalize=True,
                           value_range=(-1, 1))
    value = fid.compute()
    label = protocol_label(num_samples, real, data["image_size"], num_real=fid.num_real)
    method = decoder.name + "".join(f", {k}={v}" for k, v in decoder.describe(settings).items())
    return {"fid": value, "protocol": f"{label}, EMA weights, decoding={method} ({describe_sampling(sampling, config)})",
            "num_samples": num_samples, "sampling_seconds_rank0": round(seconds, 2)}


#################################################################################
#                               The system                                      #
#################################################################################

class GeneratorModule(ExactResumeMixin, L.LightningModule):
    """Trains a GPT / VAR / FlowAR on cached tokens; evaluates, samples and exports its EMA weights."""

    decoder = "ar"  # the decoding method of its grids and FID (a distilled student samples with its own)

    def __init__(self, config: dict, output_dir: str | None = None, tokenizer: torch.nn.Module | None = None):
        """config: {"kind": "generator", "generator": <generator node>, "data": {...}, "tokenizer": {path, hash,
        name}, "tokens": {layout, token_shape, scale_factor}, "model_args": {...}, "total_steps": int}.
        tokenizer: the frozen tokenizer (else loaded from config["tokenizer"]["path"], hash-checked)."""
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.config, self.output_dir = config["generator"], output_dir
        self.run_config = config
        self.layout = config["tokens"]["layout"]
        self.total_steps = int(config["total_steps"])
        self.model = build_generator(config)
        self.ema = EMA(self.model, self.config["ema_decay"])
        self._tokenizer: list = [tokenizer] if tokenizer is not None else []  # frozen, no submodule
        self.objective = build_objective(self.model, config)  # None: plain cross-entropy / flow matching
        self.batches_seen = 0  # drives the resumable data order
        self._resume_rng: dict | None = None  # the global RNG state of a resumed checkpoint, set at its first batch
        self.last_grid: str | None = None

    # -- the frozen tokenizer ---------------------------------------------------------------------
    @property
    def tokenizer(self) -> torch.nn.Module:
        """The frozen tokenizer on this module's device (loaded and hash-checked on first use if not given)."""
        if not self._tokenizer:
            from utils.runs import load_tokenizer_of

            self._tokenizer.append(load_tokenizer_of(self.run_config, self.output_dir, self.device).model)
        tok = self._tokenizer[0]
        if next(tok.parameters()).device != self.device:
            tok.to(self.device)
        return tok

    def _autocast(self):
        """bf16 autocast on CUDA only (quantizers keep fp32 inside)."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- loss -------------------------------------------------------------------------------------
    def _loss(self, net, codes: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss, token accuracy or None) of a batch of cached codes under ``net`` (the generator's own loss)."""
        if self.objective is None:
            return net.loss(codes, labels, self.tokenizer)
        self.objective.teacher = self.objective.teacher.to(self.device) if self.objective.teacher else None
        return net.loss(codes, labels, self.tokenizer, self.objective)

    # -- training ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        opt_cfg = self.config["optimizer"]
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]  # matrices and embeddings; no decay on norms and biases
        no_decay = [p for p in params if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": opt_cfg["weight_decay"]},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=opt_cfg["lr"], betas=tuple(opt_cfg["betas"]))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_cosine(opt_cfg["warmup_steps"], self.total_steps, opt_cfg["min_lr_ratio"]))
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = gradient_clip_val if gradient_clip_val is not None else self.config.get("grad_clip")
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def training_step(self, batch, batch_idx):
        codes, labels = batch
        with self._autocast():
            loss, acc = self._loss(self.model, codes, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite generator loss at step {self.global_step}; lower "
                                     "generator.optimizer.lr or raise warmup_steps")
        self.batches_seen += 1
        logs = {"train/loss": loss, "train/lr": self.lr_schedulers().get_last_lr()[0]}
        if acc is not None:
            logs["train/acc"] = acc
        self.log_dict(logs, batch_size=labels.shape[0])
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=labels.shape[0])
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.model)

    # -- evaluation (EMA weights) -------------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        codes, labels = batch
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # flow-matching noise: same draws every validation,
            torch.manual_seed(batch_idx)  # and the training RNG stream is left untouched (exact resume)
            with self._autocast():
                loss, acc = self._loss(self.ema.shadow, codes, labels)
        self.log("val/loss", loss, sync_dist=True, batch_size=labels.shape[0])
        if acc is not None:
            self.log("val/acc", acc, sync_dist=True, batch_size=labels.shape[0])

    def on_validation_epoch_end(self) -> None:
        if self.global_rank == 0 and self.output_dir and not self.trainer.sanity_checking:
            path = Path(self.output_dir) / "samples" / f"val_samples_step{self.global_step:07d}.png"
            self.last_grid = str(self.sample_grid(path))

    @torch.no_grad()
    def sample_grid(self, path: str | Path, sampling: SamplingConfig | None = None, seed: int | None = None) -> Path:
        """A class-conditional grid of EMA samples: one row per class, eval.grid_per_class columns."""
        ev = self.config["eval"]
        per_class = int(ev["grid_per_class"])
        labels = class_grid_labels(self.run_config["data"]["num_classes"], per_class, ev.get("grid_classes"))
        g = torch.Generator(device=self.device).manual_seed(int(ev.get("seed", 0)) if seed is None else seed)
        sampling = sampling or sampling_config(self.config["sampling"])
        with self._autocast():
            images, _ = sample_images(self.ema.shadow, self.tokenizer, labels.to(self.device), sampling,
                                      self.run_config["tokens"], g, self.decoder)
        rows = labels[::per_class].tolist()
        return save_class_grid(images, per_class, path, class_names(self.run_config["data"], rows))

    def fid(self, num_samples: int, batch_size: int = 64, rank: int = 0, world_size: int = 1) -> dict:
        """FID of the EMA weights against the dataset's eval.fid_split (every rank calls it; states are summed)."""
        ev = self.config["eval"]
        with self._autocast():
            return generator_fid(self.ema.shadow, self.tokenizer, self.run_config, num_samples,
                                 sampling_config(self.config["sampling"]), batch_size, int(ev.get("seed", 0)),
                                 self.device, ev.get("fid_split", "test"), ev.get("fid_reference_images"),
                                 rank, world_size, decoder=self.decoder)


def count_parameters(model: torch.nn.Module) -> str:
    """'12.3M' / '45.6k' parameters."""
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"
