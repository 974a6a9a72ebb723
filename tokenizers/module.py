"""The tokenizer LightningModule: losses, optimizers, EMA, metrics and reconstruction grids.

The networks stay plain nn.Modules (tokenizers/autoencoder.py + a quantizer); this system owns
everything about training them. Optimization is manual so that a discriminator with its own
optimizer (adversarial training) fits in the same step.

Losses (config `tokenizer.loss`): reconstruction (L1/L2/1-MS-SSIM) + `perceptual` x LPIPS +
`quantizer` x the quantizer's loss + `adversarial.weight` x lambda x G loss, where lambda is VQGAN's
adaptive weight (or 1) and the PatchGAN discriminator trains on the same batch from
`adversarial.start_step` on. With `adversarial.weight: 0` no discriminator exists at all.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from torchvision.utils import save_image

from evaluation.codebook import CodebookUsage
from evaluation.reconstruction import PSNR, SSIM
from tokenizers.autoencoder import Tokenizer
from tokenizers.discriminator import PatchGAN, adaptive_weight, gan_losses
from tokenizers.losses import ReconstructionLoss
from tokenizers.lpips import LPIPS
from utils.ema import EMA
from utils.grids import label_rows
from utils.schedule import rampdown, warmup_cosine

# Under DDP Lightning asks for sync_dist=True on epoch-level logs; these are torchmetrics values whose compute()
# already reduced the states over all ranks, so a second (mean) reduction would only add rounding.
warnings.filterwarnings("ignore",
                        message=r".*self\.log\('(val|test)/(psnr|ssim|usage|perplexity|rfid)'.*sync_dist=True")

ADVERSARIAL_DEFAULTS = {"weight": 0.0, "start_step": 0, "disc_lr": None, "disc_betas": [0.5, 0.9], "ndf": 64,
                        "layers": 3, "norm": "batch", "adaptive": True, "loss": "hinge"}


def build_tokenizer(config: dict, image_channels: int) -> Tokenizer:
    """A Tokenizer from a tokenizer config node (quantizer + autoencoder)."""
    quantizer = instantiate(config["quantizer"])
    return Tokenizer(quantizer, image_channels=image_channels, **config["autoencoder"])


class TokenizerModule(L.LightningModule):
    """Trains a Tokenizer; evaluates (and exports) its EMA weights."""

    def __init__(self, config: dict, output_dir: str | None = None):
        """config: {"kind": "tokenizer", "tokenizer": <tokenizer node>, "data": {name, image_size, channels,
        num_classes}, "total_steps": int}, plain containers only (checkpoints load with weights_only=True)."""
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.config, self.output_dir = config["tokenizer"], output_dir
        self.total_steps = int(config["total_steps"])
        self.automatic_optimization = False
        self.model = build_tokenizer(self.config, config["data"]["channels"])
        self.model.token_shape(config["data"]["image_size"])  # fail early on a size the autoencoder cannot take
        self.ema = EMA(self.model, self.config["ema_decay"])
        loss_cfg = self.config["loss"]
        self.rec_loss = ReconstructionLoss(**loss_cfg["reconstruction"])
        # LPIPS is frozen and pretrained: held in a plain list, so it is no submodule (not in state_dict,
        # .ckpt or model.safetensors, not in any optimizer); `perceptual_net` moves it to our device.
        self.perceptual_weight = float(loss_cfg.get("perceptual", 0.0))
        self._perceptual: list[LPIPS] = [LPIPS()] if self.perceptual_weight > 0 else []
        self.adv = {**ADVERSARIAL_DEFAULTS, **(loss_cfg.get("adversarial") or {})}
        self.discriminator: PatchGAN | None = None  # only exists when adversarial.weight > 0
        if float(self.adv["weight"]) > 0:
            self.discriminator = PatchGAN(config["data"]["channels"], ndf=int(self.adv["ndf"]),
                                          layers=int(self.adv["layers"]), norm=self.adv["norm"])
            self.d_loss_fn, self.g_loss_fn = gan_losses(self.adv["loss"])
        self.batches_seen = 0  # drives the resumable data order
        ramp = loss_cfg.get("quantizer_ramp") or {}
        self.quantizer_ramp = rampdown(float(ramp.get("multiplier", 1.0)), int(ramp.get("steps", 0)))
        self.codebook_size = self.model.quantizer.codebook_size
        for stage in ("val", "test"):
            setattr(self, f"{stage}_psnr", PSNR())
            setattr(self, f"{stage}_ssim", SSIM())
            if self.codebook_size:
                setattr(self, f"{stage}_usage", CodebookUsage(self.codebook_size))
        self._fid_images: dict[str, list] = {}

    @property
    def ddp_find_unused_parameters(self) -> bool:
        """DDP must look for unused parameters with a discriminator: the G and D backward passes of one step each
        leave the other net without gradients (train.py turns trainer.strategy=ddp into that DDP)."""
        return self.discriminator is not None

    # -- training --------------------------------------------------------------------------------
    def configure_optimizers(self):
        opt_cfg = self.config["optimizer"]
        opt = torch.optim.AdamW(self.model.parameters(), lr=opt_cfg["lr"], betas=tuple(opt_cfg["betas"]),
                                weight_decay=opt_cfg["weight_decay"])
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_cosine(opt_cfg["warmup_steps"], self.total_steps, opt_cfg["min_lr_ratio"]))
        if self.discriminator is None:
            return [opt], [{"scheduler": sched, "interval": "step"}]
        # The discriminator: Adam (VQGAN's betas by default), the same warmup + cosine shape over its own steps.
        d_lr = self.adv["disc_lr"] if self.adv["disc_lr"] is not None else opt_cfg["lr"]
        d_opt = torch.optim.Adam(self.discriminator.parameters(), lr=float(d_lr), betas=tuple(self.adv["disc_betas"]))
        d_steps = max(1, self.total_steps - int(self.adv["start_step"]))
        d_sched = torch.optim.lr_scheduler.LambdaLR(
            d_opt, warmup_cosine(opt_cfg["warmup_steps"], d_steps, opt_cfg["min_lr_ratio"]))
        return [opt, d_opt], [{"scheduler": sched, "interval": "step"}, {"scheduler": d_sched, "interval": "step"}]

    @property
    def perceptual_net(self) -> LPIPS | None:
        """The frozen LPIPS net on this module's device (it is no submodule, so .to() does not move it)."""
        if not self._perceptual:
            return None
        net = self._perceptual[0]
        if net.shift.device != self.device:
            net.to(self.device)
        return net

    def adversarial_active(self) -> bool:
        """True from adversarial.start_step on (global_step = batches already trained)."""
        return self.discriminator is not None and self.global_step >= int(self.adv["start_step"])

    def training_step(self, batch, batch_idx):
        images, _ = batch
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        if self.discriminator is None:
            optimizers, schedulers = [optimizers], [schedulers]
        opt, sched = optimizers[0], schedulers[0]
        recon, q = self.model(images)  # (B, C, H, W)
        rec, parts = self.rec_loss(recon, images)
        logs = {f"train/{k}": v for k, v in parts.items()}
        nll = rec  # what VQGAN's adaptive weight balances the GAN term against
        lpips = self.perceptual_net
        if lpips is not None:
            p_loss = lpips(recon, images).mean()
            nll = nll + self.perceptual_weight * p_loss
            logs["train/lpips"] = p_loss
        q_weight = self.config["loss"]["quantizer"] * self.quantizer_ramp(self.global_step)
        loss = nll + q_weight * q.loss
        adversarial = self.adversarial_active()
        if adversarial:
            self.discriminator.requires_grad_(False)  # the generator step leaves D's grads alone
            g_loss = self.g_loss_fn(self.discriminator(recon))
            lam = (adaptive_weight(nll, g_loss, self.model.decoder.last_layer) if self.adv["adaptive"]
                   else torch.ones((), device=loss.device))
            loss = loss + float(self.adv["weight"]) * lam * g_loss
            logs.update({"train/g_loss": g_loss, "train/adaptive_weight": lam})
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite tokenizer loss at step {self.global_step}: {parts}, "
                                     f"quantizer {float(q.loss)}, {({k: float(v) for k, v in logs.items()})}; "
                                     "lower optimizer.lr or raise warmup_steps")
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=self.config["grad_clip"], gradient_clip_algorithm="norm")
        opt.step()
        sched.step()
        if adversarial:
            self.discriminator.requires_grad_(True)
            logs.update(self._discriminator_step(images, recon.detach(), optimizers[1], schedulers[1]))
        self.ema.update(self.model)
        self.batches_seen += 1
        logs.update({"train/loss": loss, "train/quant_loss": q.loss, "train/quant_weight": q_weight,
                     **{f"train/{k}": v for k, v in q.stats.items()}, "train/lr": sched.get_last_lr()[0]})
        self.log_dict(logs, prog_bar=False)
        self.log("loss", loss, prog_bar=True, logger=False)
        return loss

    def _discriminator_step(self, images: torch.Tensor, recon: torch.Tensor, d_opt, d_sched) -> dict:
        """One update of D on real images and detached reconstructions; returns its logs."""
        real_logits = self.discriminator(images)  # (B, 1, h, w); real and fake in separate passes, as VQGAN
        fake_logits = self.discriminator(recon)
        d_loss = self.d_loss_fn(real_logits, fake_logits)
        d_opt.zero_grad(set_to_none=True)  # also drops anything the generator step left
        self.manual_backward(d_loss)
        self.clip_gradients(d_opt, gradient_clip_val=self.config["grad_clip"], gradient_clip_algorithm="norm")
        # Not d_opt.step(): in manual optimization every LightningOptimizer.step() advances global_step, so two
        # steps per batch would count each batch twice (max_steps, every_n_train_steps, val_check_interval, the
        # schedules and resume all count batches). The strategy's optimizer_step is what LightningOptimizer.step()
        # calls inside (precision plugin: AMP scaler, hooks), minus that counter.
        self.trainer.strategy.optimizer_step(d_opt.optimizer, closure=_no_closure)
        d_sched.step()
        return {"train/d_loss": d_loss.detach(), "train/d_real": real_logits.detach().mean(),
                "train/d_fake": fake_logits.detach().mean(), "train/d_lr": d_sched.get_last_lr()[0]}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["batches_seen"] = self.batches_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.batches_seen = int(checkpoint.get("batches_seen", 0))
        has_d = any(k.startswith("discriminator.") for k in checkpoint.get("state_dict", {}))
        if has_d != (self.discriminator is not None):
            was = "with" if has_d else "without"
            raise ValueError(f"this checkpoint was trained {was} a discriminator, but tokenizer.loss.adversarial.weight="
                             f"{self.adv['weight']}; resume with the run's own adversarial settings")

    # -- evaluation (EMA weights) ------------------------------------------------------------------
    def on_train_start(self) -> None:
        for stage in ("val",):  # the sanity check filled them
            for name in ("psnr", "ssim", "usage"):
                if hasattr(self, f"{stage}_{name}"):
                    getattr(self, f"{stage}_{name}").reset()

    def _eval_step(self, batch, batch_idx, stage: str) -> None:
        images, _ = batch
        net = self.ema.shadow
        recon, q = net(images)
        getattr(self, f"{stage}_psnr").update(recon, images)
        getattr(self, f"{stage}_ssim").update(recon, images)
        if self.codebook_size:
            getattr(self, f"{stage}_usage").update(q.indices)
        if batch_idx == 0 and self.global_rank == 0:
            self._save_grid(images, recon, stage)
        n_fid = self._rfid_share() if stage == "test" else 0
        if n_fid:
            bank = self._fid_images.setdefault(stage, [])
            have = sum(x[0].shape[0] for x in bank)
            if have < n_fid:
                take = n_fid - have
                bank.append((images[:take].cpu(), recon[:take].clamp(-1, 1).cpu()))

    def _eval_end(self, stage: str) -> dict:
        out = {f"{stage}/psnr": getattr(self, f"{stage}_psnr").compute(),
               f"{stage}/ssim": getattr(self, f"{stage}_ssim").compute()}
        if self.codebook_size:
            usage = getattr(self, f"{stage}_usage").compute()
            out[f"{stage}/usage"], out[f"{stage}/perplexity"] = usage["usage"], usage["perplexity"]
        for name in ("psnr", "ssim", "usage"):
            if hasattr(self, f"{stage}_{name}"):
                getattr(self, f"{stage}_{name}").reset()
        bank = self._fid_images.pop(stage, [])
        if stage == "test" and self._rfid_count():  # every rank, even one whose share is empty (collectives)
            out[f"{stage}/rfid"] = torch.tensor(self._rfid(bank), dtype=torch.float32)
        self.log_dict(out, sync_dist=False)
        return out

    def _rfid_count(self) -> int:
        """How many test images rFID covers: eval.rfid_images, at most the whole test split."""
        n = int(self.config["eval"].get("rfid_images", 0))
        test_set = getattr(self.trainer.datamodule, "test_set", None)
        return min(n, len(test_set)) if test_set is not None else n

    def _rfid_share(self) -> int:
        """How many test images this rank keeps for rFID: under DDP the unshuffled test shards hold images
        r, r + W, r + 2W, ... (DistributedSampler), so rank r's share of the first n is len(range(r, n, W))."""
        return len(range(self.global_rank, self._rfid_count(), self.trainer.world_size))

    def _rfid(self, bank: list) -> float:
        """FID of reconstructions vs the same test images. The real side's statistics are cached on disk: they
        are the first n images of the unshuffled test split, which one process holds, or all ranks' shares
        together; then every rank adds its reconstructions to one FID whose states are summed over ranks."""
        from evaluation.fid import FID, fid_inception, reconstruction_fid, reference_statistics

        real, fake = (torch.cat([b[i] for b in bank]) if bank else torch.zeros(0) for i in (0, 1))  # (n_rank, C, H, W)
        data, dm = self.hparams.config["data"], self.trainer.datamodule
        split = dm.test_split if dm is not None else "test"
        if dm is None or self.trainer.world_size == 1:  # another loader's images need not be the split's first n
            return reconstruction_fid(fake, data["name"], split, data["image_size"], real=real if dm is None else None,
                                      net=fid_inception(device=self.device), settings=data.get("settings"))
        # the shares are a prefix of the split: images 0 .. n - 1 (fewer than eval.rfid_images under limit_test_batches)
        n = int(self.trainer.strategy.reduce(torch.tensor(fake.shape[0], device=self.device), reduce_op="sum"))
        fid = FID(device=self.device)
        if self.global_rank == 0:  # the real statistics count once in the sum over ranks (see FID)
            stats = reference_statistics(data["name"], split, data["image_size"], n,
                                         net=fid_inception(device=self.device), settings=data.get("settings"))
            fid.set_real_statistics(stats.mu, stats.sigma, stats.n)
        if fake.shape[0]:
            fid.update(fake.to(self.device), real=False)
        return fid.compute()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def _save_grid(self, images: torch.Tensor, recon: torch.Tensor, stage: str) -> None:
        if not self.output_dir:
            return
        n = min(int(self.config["eval"]["grid_images"]), images.shape[0])
        path = grid_path(self.output_dir, stage, self.global_step)
        save_reconstruction_grid(images[:n], recon[:n], path)
        self.last_grid = str(path)


def _no_closure() -> None:
    """The optimizer closure of a manual step: the backward already ran."""
    return None


def grid_path(output_dir: str, stage: str, step: int) -> Path:
    return Path(output_dir) / "samples" / f"{stage}_reconstructions_step{step:07d}.png"


def save_reconstruction_grid(images: torch.Tensor, recon: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Rows alternate: `nrow` originals, then their reconstructions below them (each row labelled so)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(0, images.shape[0], nrow):
        rows += [images[i:i + nrow], recon[i:i + nrow].clamp(-1, 1)]
    pad = [torch.full_like(images[:1], -1.0).expand(nrow - r.shape[0], *images.shape[1:]) for r in rows]
    grid = torch.cat([torch.cat([r, p]) for r, p in zip(rows, pad)])
    save_image(grid.float().cpu(), path, nrow=nrow, normalize=True, value_range=(-1, 1), padding=1, pad_value=0.5)
    return label_rows(path, ["original", "reconstruction"] * (len(rows) // 2))


def total_training_steps(max_steps: int, max_epochs: int | None, batches_per_epoch: int) -> int:
    """The schedule's length: max_steps when set, else epochs x batches."""
    if max_steps and max_steps > 0:
        return max_steps
    return max(1, (max_epochs or 1) * batches_per_epoch)


