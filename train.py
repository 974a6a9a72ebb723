"""Train a tokar model: python train.py task=tokenizer tokenizer=fsq data=fashion_mnist [key=value ...]

Everything lands in outputs/<task>/<time>/: checkpoints/{best,last}.ckpt, model.safetensors (EMA
weights), config.yaml, metrics.json and samples/. Resume a killed run with ckpt_path=<last.ckpt>.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from utils.checkpoint import AtomicCheckpointIO, CheckpointError, atomic_replace, export_run
from utils.hydra import instantiate_dict, register_resolvers

log = logging.getLogger("tokar")
TASKS = ("tokenizer",)


def output_dir_of(cfg: DictConfig) -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # composed outside @hydra.main (tests call train() directly)
        return Path(cfg.paths.output_dir)


def check_fresh_or_resuming(out: Path, ckpt_path: str | None) -> None:
    """No run overwrites another's outputs: a folder that already holds checkpoints is only reused to resume."""
    existing = list((out / "checkpoints").glob("*.ckpt")) if (out / "checkpoints").exists() else []
    if existing and not ckpt_path:
        raise FileExistsError(f"{out} already holds checkpoints ({existing[0].name}); resume it with "
                              f"ckpt_path={existing[0]} or start a new run folder")


def check_resume_compatible(ckpt_path: str, config: dict) -> None:
    """A resumed checkpoint must be of the same kind and model settings as the config."""
    p = Path(ckpt_path)
    if not p.exists():
        raise CheckpointError(f"ckpt_path={p} does not exist")
    ckpt = torch.load(p, map_location="cpu", weights_only=True)
    old = ckpt.get("hyper_parameters", {}).get("config")
    if old is None:
        raise CheckpointError(f"{p} is not a tokar checkpoint (no hyper_parameters.config)")
    if old.get("kind") != config["kind"]:
        raise CheckpointError(f"{p} is a {old.get('kind')} checkpoint; task={config['kind']} cannot resume it")
    node = config["kind"]
    keys = [k for k in ("quantizer", "autoencoder") if old[node].get(k) != config[node].get(k)]
    data_keys = [k for k in ("image_size", "channels") if old["data"].get(k) != config["data"].get(k)]
    if keys or data_keys:
        raise CheckpointError(f"{p} was trained with other settings ({', '.join(keys + ['data.' + k for k in data_keys])}"
                              f" differ); resume with the run's own config.yaml settings")


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Train the task's model from a composed config; returns (metrics, objects)."""
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task} is not available; choose one of {', '.join(TASKS)}")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    out = output_dir_of(cfg)
    check_fresh_or_resuming(out, cfg.get("ckpt_path"))
    log.info("output folder: %s", out)

    log.info("instantiating datamodule <%s>", cfg.data._target_)
    datamodule = instantiate(cfg.data)
    data_info = {"name": cfg.data.name, "image_size": int(cfg.data.image_size), "channels": int(cfg.data.channels),
                 "num_classes": datamodule.num_classes}
    max_steps = int(cfg.trainer.max_steps)
    if max_steps <= 0:
        datamodule.setup("fit")
        max_steps = max(1, int(cfg.trainer.max_epochs) * (len(datamodule.train_set) // cfg.data.batch_size))
    config = {"kind": cfg.task, cfg.task: OmegaConf.to_container(cfg[cfg.task], resolve=True), "data": data_info,
              "total_steps": max_steps}
    if cfg.get("ckpt_path"):
        check_resume_compatible(cfg.ckpt_path, config)

    from tokenizers.module import TokenizerModule

    model = TokenizerModule(config, output_dir=str(out))
    callbacks = instantiate_dict(cfg.get("callbacks"), "callback")
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.ProgressBar)]
    loggers = instantiate_dict(cfg.get("logger"), "logger")
    log.info("instantiating trainer <%s>", cfg.trainer._target_)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                     plugins=[AtomicCheckpointIO()])

    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    train_seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    if trainer.is_global_zero and not cfg.trainer.get("fast_dev_run"):
        export_run(model.ema.shadow, config, out, kind=cfg.task)
    if cfg.get("test_after_training") and not cfg.trainer.get("fast_dev_run"):
        results = trainer.test(model, datamodule=datamodule, verbose=False)
        metrics.update({k: float(v) for k, v in (results[0] if results else {}).items()})
    summary = {"task": cfg.task, "tokenizer": config[cfg.task].get("name"), "data": data_info,
               "steps": int(trainer.global_step), "train_seconds": round(train_seconds, 1),
               "metrics": metrics, "output_dir": str(out),
               "grid": getattr(model, "last_grid", None),
               "protocol": f"per-image PSNR/SSIM on uint8, usage/perplexity over the whole {cfg.data.test_split} "
                           f"split of {cfg.data.name} ({data_info['image_size']}px), EMA weights"}
    if trainer.is_global_zero:
        atomic_replace(lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)), out / "metrics.json")
        print_summary(summary, out)
    return metrics, {"model": model, "trainer": trainer, "datamodule": datamodule, "output_dir": out}


def print_summary(summary: dict, out: Path) -> None:
    m = summary["metrics"]
    lines = [f"run folder : {out}", f"metrics    : {out / 'metrics.json'}"]
    if summary.get("grid"):
        lines.append(f"grid       : {summary['grid']}")
    if (out / "model.safetensors").exists():
        lines.append(f"weights    : {out / 'model.safetensors'} (EMA) + config.yaml")
    for key in ("test/psnr", "test/ssim", "test/usage", "test/perplexity", "test/rfid"):
        if key in m:
            lines.append(f"{key:<11}: {m[key]:.4f}")
    lines.append(f"steps      : {summary['steps']} in {summary['train_seconds']} s")
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    register_resolvers()
    metrics, _ = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
