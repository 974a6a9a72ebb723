"""Train a tokar model.

    python train.py task=tokenizer tokenizer=fsq data=fashion_mnist [key=value ...]
    python train.py task=generator generator=var tokenizer_ckpt=outputs/tokenizer/<time> [key=value ...]

Everything lands in outputs/<task>/<time>/: checkpoints/{best,last}.ckpt, model.safetensors (EMA
weights), config.yaml, metrics.json and samples/. Resume a killed run with ckpt_path=<its run folder>.
A generator first encodes the data once with the tokenizer run into a token cache
(data/token_cache.py, under ${paths.data_dir}/token_cache/) and then trains on the codes.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import warnings
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from data.registry import content_settings
from utils.checkpoint import AtomicCheckpointIO, CheckpointError, atomic_replace, export_run
from utils.hydra import check_command_line, check_ranges, instantiate_dict, register_resolvers
from utils.io import stale_temp_files
from utils.loggers import FlushLogsOnCheckpoint, checkpoint_step, instantiate_loggers
from utils.runs import load_run, resume_checkpoint, torch_checkpoint

log = logging.getLogger("tokar")
# Lightning noise that says nothing about the run: the EMA copy is meant to stay in eval mode.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
# Our manual-optimization checkpoints are meant to hold the state after the step (batches_seen counts it).
warnings.filterwarnings("ignore", message=r".*Using ModelCheckpoint with manual optimization.*")
# Resuming mid-epoch, Lightning warns that the dataloader "is not resumable" (it looks for a state_dict on the
# loader). tokar's resume is exact without one: data.datamodule.ResumableSampler restarts at the batch the
# checkpoint's batches_seen counts (tests/test_train.py checks the resumed weights equal the uninterrupted run's).
warnings.filterwarnings("ignore", message=r".*dataloader is not resumable.*")
TASKS = ("tokenizer", "generator", "drafter", "distill")
HELP = """python train.py task=<task> [group=option ...] [key=value ...]: train a tokar model.

Tasks:
  task=tokenizer  a visual tokenizer (images -> codes -> images), trained on data=...
                    python train.py task=tokenizer tokenizer=fsq data=fashion_mnist
  task=generator  a class-conditional generator of a finished tokenizer run's codes
                    python train.py task=generator generator=var tokenizer_ckpt=outputs/tokenizer/<time>
                  (generator=var needs tokenizer=msvq, flowar tokenizer=kl, gpt a single-scale discrete one)
  task=drafter    LANTERN's draft head for a finished GPT run (decoding=lantern)
                    python train.py task=drafter generator_ckpt=outputs/generator/<time>
  task=distill    distilled decoding (DD1): noise -> tokens pairs from a GPT or VAR run, then a one/two-step student
                    python train.py task=distill teacher_ckpt=outputs/generator/<time>
Resume a killed run:  python train.py ckpt_path=outputs/<task>/<time>   (its folder or checkpoints/last.ckpt)
Outputs: outputs/<task>/<time>/: checkpoints/, model.safetensors + config.yaml, metrics.json, csv/metrics.csv"""
# the values a run cannot use, checked before anything is created: (low, low inclusive, high, high inclusive)
TRAIN_RANGES = {"data.image_size": (1, True, None, False), "data.channels": (1, True, 4, False),
                "data.batch_size": (1, True, None, False), "data.eval_batch_size": (1, True, None, False),
                "data.num_workers": (0, True, None, False), "data.size": (1, True, None, False),
                "trainer.max_steps": (-1, True, None, False), "trainer.log_every_n_steps": (1, True, None, False),
                "trainer.limit_val_batches": (0, True, None, False)}
# the monitor of each task's configs/task/<task>.yaml: an experiment that sets the `task` key instead of the group
TASK_MONITOR = {"tokenizer": "val/psnr", "generator": "val/loss", "drafter": "val/loss", "distill": "val/loss"}
RESUME_KEYS = {"tokenizer": ("quantizer", "autoencoder"), "generator": ("name", "model")}


def output_dir_of(cfg: DictConfig) -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # composed outside @hydra.main (tests call train() directly)
        return Path(cfg.paths.output_dir)


def pin_run_dir(out: Path) -> None:
    """Point hydra.run.dir at this run's folder: Lightning starts ranks 1.. with hydra.run.dir=<HydraConfig's
    run.dir>, and its ${run_dir:...} resolver would name a new timestamped folder in each of them."""
    if HydraConfig.initialized():
        run = HydraConfig.get().run
        with read_write(run):
            run.dir = str(out)


def strategy_of(cfg: DictConfig, model: L.LightningModule):
    """trainer.strategy, turning plain DDP into DDP that finds unused parameters where the module needs it
    (``ddp_find_unused_parameters``: a GAN tokenizer's two backward passes each leave the other net unused)."""
    strategy = cfg.trainer.strategy
    if strategy == "ddp" and getattr(model, "ddp_find_unused_parameters", False):
        return "ddp_find_unused_parameters_true"
    return strategy


def check_launch(trainer: L.Trainer, strategy) -> None:
    """Multi-process runs start their ranks so that every rank runs all of train() with the process group up."""
    launcher = trainer.strategy.launcher
    if trainer.world_size == 1 or launcher is None:
        return
    if isinstance(launcher, _MultiProcessingLauncher):
        raise ValueError(f"trainer.strategy={strategy} trains in spawned workers and runs the rest of train.py (test, "
                         "FID, export, metrics.json) in a parent without the process group, so steps, metrics and "
                         "FID would be wrong; use trainer.strategy=ddp (trainer=ddp_sim on CPU, trainer=ddp on GPUs)")
    by_script = Path(sys.argv[0]).resolve() == Path(__file__).resolve()
    relaunches = not launcher.cluster_environment.creates_processes_externally
    if isinstance(launcher, _SubprocessScriptLauncher) and relaunches and not by_script:
        raise ValueError(f"trainer.strategy={strategy} starts ranks 1.. by running this program ({sys.argv[0]}) "
                         "again; run multi-process training as `python train.py ...` (or under torchrun / SLURM, which "
                         "start every rank themselves), not by calling train() from another program")


def check_fresh_or_resuming(out: Path, ckpt_path: str | None) -> None:
    """No run overwrites another's outputs: a folder that already holds checkpoints is only reused to resume."""
    existing = list((out / "checkpoints").glob("*.ckpt")) if (out / "checkpoints").exists() else []
    if existing and not ckpt_path:
        raise FileExistsError(f"{out} already holds checkpoints ({existing[0].name}); resume it with "
                              f"ckpt_path={existing[0]} or start a new run folder")


def check_train_config(cfg: DictConfig) -> None:
    """A ValueError naming the setting a run cannot use: an unknown task, a value out of range."""
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task} is not available; choose one of {', '.join(TASKS)}")
    others = {m: t for t, m in TASK_MONITOR.items() if m != TASK_MONITOR[cfg.task]}
    if cfg.monitor.metric in others:
        raise ValueError(f"task={cfg.task} with monitor.metric={cfg.monitor.metric} (task={others[cfg.monitor.metric]}"
                         f"'s metric): select the task with the task group (task={cfg.task}, in an experiment "
                         f"`- override /task: {cfg.task}`), not the `task` key alone")
    check_ranges(cfg, TRAIN_RANGES)


def remove_stale_temp_files(out: Path) -> None:
    """Delete the temp files a killed write left in the run folder (never a finished file: those have no .tmp)."""
    if int(os.environ.get("RANK", 0)):  # rank 0 owns the run folder
        return
    for folder in (out, out / "checkpoints"):
        for tmp in stale_temp_files(folder):
            log.warning("removing %s, left by a write that was killed", tmp)
            tmp.unlink(missing_ok=True)


def check_resume_compatible(ckpt_path: str, config: dict) -> None:
    """A resumed checkpoint must be of the same kind and model settings as the config."""
    p = resume_checkpoint(ckpt_path)
    ckpt = torch_checkpoint(p)
    old = ckpt.get("hyper_parameters", {}).get("config")
    if old is None:
        raise CheckpointError(f"{p} is not a tokar checkpoint (no hyper_parameters.config)")
    if old.get("kind") != config["kind"]:
        raise CheckpointError(f"{p} is a {old.get('kind')} checkpoint; task={config['kind']} cannot resume it")
    node = config["kind"]
    keys = [k for k in RESUME_KEYS.get(node, ()) if old[node].get(k) != config[node].get(k)]
    old_tok, new_tok = old.get("tokenizer", {}).get("hash"), (config.get("tokenizer") or {}).get("hash")
    if node == "generator" and old_tok != new_tok:
        raise CheckpointError(f"{p} was trained on another tokenizer (hash {str(old_tok)[:12]}, tokenizer_ckpt has "
                              f"{str(new_tok)[:12]}); resume with the run's own tokenizer_ckpt")
    data_keys = [k for k in ("image_size", "channels") if old["data"].get(k) != config["data"].get(k)]
    if keys or data_keys:
        raise CheckpointError(f"{p} was trained with other settings ({', '.join(keys + ['data.' + k for k in data_keys])}"
                              f" differ); resume with the run's own config.yaml settings")


def schedule_steps(cfg: DictConfig, datamodule) -> int:
    """The schedule's length: trainer.max_steps, or max_epochs x batches per epoch when max_steps <= 0."""
    max_steps = int(cfg.trainer.max_steps)
    if max_steps <= 0:
        datamodule.setup("fit")
        max_steps = max(1, int(cfg.trainer.max_epochs) * (len(datamodule.train_set) // cfg.data.batch_size))
    return max_steps


def prepare_tokenizer_task(cfg: DictConfig, out: Path):
    """(datamodule, config, model) of task=tokenizer."""
    log.info("instantiating datamodule <%s>", cfg.data._target_)
    datamodule = instantiate(cfg.data)
    data_info = {"name": cfg.data.name, "image_size": int(cfg.data.image_size), "channels": int(cfg.data.channels),
                 "num_classes": datamodule.num_classes, "class_names": datamodule.class_names,
                 "settings": content_settings(cfg.data.name, datamodule.kwargs)}
    config = {"kind": cfg.task, cfg.task: OmegaConf.to_container(cfg[cfg.task], resolve=True), "data": data_info,
              "total_steps": schedule_steps(cfg, datamodule)}
    if cfg.get("ckpt_path"):
        check_resume_compatible(cfg.ckpt_path, config)
    from tokenizers.module import TokenizerModule

    return datamodule, config, TokenizerModule(config, output_dir=str(out))


def init_generator_weights(module, config: dict, source) -> None:
    """Start a generator run from another run's (EMA) weights: fine-tuning with a fresh optimizer and schedule.

    The source must read the same tokenizer and data and have the same architecture (model and model_args).
    """
    from utils.runs import check_same_tokenizer, load_generator

    src, _, sconfig = load_generator(source, "cpu")
    check_same_tokenizer(config, sconfig, "generator.init_from", "this run", source)
    if sconfig["model_args"] != config["model_args"] or sconfig["generator"]["model"] != config["generator"]["model"]:
        raise CheckpointError(f"generator.init_from={source} is a {sconfig['generator']['model']} with "
                              f"{sconfig['model_args']}; this run builds {config['generator']['model']} with "
                              f"{config['model_args']}: set generator.model to the source's")
    module.model.load_state_dict(src.state_dict())
    module.ema.shadow.load_state_dict(src.state_dict())
    log.info("generator weights initialised from %s", source)


def prepare_generator_task(cfg: DictConfig, out: Path):
    """(datamodule, config, model) of task=generator: load the tokenizer run, check the pairing, build the caches."""
    from data.token_cache import TokenDataModule, layout_of, prepare_token_caches, read_metadata
    from generators.module import GeneratorModule, check_pairing, count_parameters, generator_class, model_args

    if not cfg.get("tokenizer_ckpt"):
        raise ValueError("task=generator needs the tokenizer whose codes it learns: tokenizer_ckpt=<tokenizer run "
                         "folder> (outputs/tokenizer/<time>, from python train.py task=tokenizer "
                         "tokenizer=msvq|kl|...)")
    gen = cfg.generator.name
    generator_class(gen)  # an unknown name fails here, listing the generators
    on_cuda = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    # each rank on its own GPU (LOCAL_RANK: Lightning's, torchrun's and SLURM's launchers set it)
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()) if on_cuda
              else torch.device("cpu"))
    run = load_run(cfg.tokenizer_ckpt, "tokenizer", device, exported=True, role="tokenizer_ckpt")
    check_pairing(gen, run.model.quantizer, cfg.tokenizer_ckpt)
    tok_channels = run.config["data"]["channels"]
    if int(cfg.data.channels) != int(tok_channels):
        raise ValueError(f"data={cfg.data.name} has {cfg.data.channels} channels, the tokenizer {run.run_dir} was "
                         f"trained on {tok_channels}-channel images ({run.config['data']['name']})")
    run.model.token_shape(int(cfg.data.image_size))  # fails early on a size the tokenizer cannot take

    log.info("instantiating datamodule <%s> (images, for the token cache)", cfg.data._target_)
    images = instantiate(cfg.data)
    with torch.random.fork_rng(devices=[device] if on_cuda else []):  # the model's init must not depend on whether
        caches = prepare_token_caches(run, images, ["train", cfg.data.val_split],  # the caches existed already
                                      Path(cfg.paths.data_dir) / "token_cache",
                                      batch_size=int(cfg.data.eval_batch_size), device=device)
    meta = read_metadata(caches["train"])
    datamodule = TokenDataModule(caches, batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
                                 num_workers=cfg.data.num_workers, val_split=cfg.data.val_split,
                                 test_split=cfg.data.val_split, seed=cfg.data.seed)
    num_classes = int(meta["num_classes"])
    data_info = {"name": cfg.data.name, "image_size": int(cfg.data.image_size), "channels": int(cfg.data.channels),
                 "num_classes": num_classes, "class_names": images.class_names,
                 "settings": content_settings(cfg.data.name, images.kwargs)}
    generator_cfg = OmegaConf.to_container(cfg.generator, resolve=True)
    image_size = int(cfg.data.image_size)
    token_shape = run.model.token_shape(image_size)
    config = {"kind": "generator", "generator": generator_cfg, "data": data_info,
              "tokenizer": {"path": str(run.run_dir), "hash": run.hash, "name": run.config["tokenizer"].get("name")},
              "tokens": {"layout": layout_of(run.model.quantizer),
                         "token_shape": [list(t) for t in token_shape] if run.model.quantizer.multiscale
                         else list(token_shape),
                         "scale_factor": float(meta.get("scale_factor", 1.0)),
                         "cache": {split: str(p) for split, p in caches.items()}},
              "model_args": model_args(gen, run.model, image_size, num_classes, generator_cfg["model"]),
              "total_steps": schedule_steps(cfg, datamodule)}
    if cfg.get("ckpt_path"):
        check_resume_compatible(cfg.ckpt_path, config)
    model = GeneratorModule(config, output_dir=str(out), tokenizer=run.model)
    if cfg.generator.get("init_from") and not cfg.get("ckpt_path"):
        init_generator_weights(model, config, cfg.generator.init_from)
    log.info("generator %s (%s parameters) on %s codes of the tokenizer %s", gen, count_parameters(model.model),
             config["tokens"]["layout"], run.run_dir)
    return datamodule, config, model


def prepare_drafter_task(cfg: DictConfig, out: Path):
    """(datamodule, config, model) of task=drafter (generators/drafter_module.py)."""
    from generators.drafter_module import prepare_drafter_task as prepare

    return prepare(cfg, out)


def prepare_distill_task(cfg: DictConfig, out: Path):
    """(datamodule, config, model) of task=distill: the teacher's pairs, then the student (generators/distill_student.py)."""
    from generators.distill_student import prepare_distill

    on_cuda = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    datamodule, config, model = prepare_distill(cfg, out, device, schedule_steps)
    if cfg.get("ckpt_path"):
        check_resume_compatible(cfg.ckpt_path, config)
    return datamodule, config, model


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Train the task's model from a composed config; returns (metrics, objects)."""
    check_train_config(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    out = output_dir_of(cfg)
    pin_run_dir(out)
    resume_step = None
    if cfg.get("ckpt_path"):  # a run folder resumes its checkpoints/last.ckpt
        with open_dict(cfg):
            cfg.ckpt_path = str(resume_checkpoint(cfg.ckpt_path))
        resume_step = checkpoint_step(torch_checkpoint(cfg.ckpt_path))
    check_fresh_or_resuming(out, cfg.get("ckpt_path"))
    remove_stale_temp_files(out)
    log.info("output folder: %s", out)

    prepare = {"generator": prepare_generator_task, "drafter": prepare_drafter_task,
               "distill": prepare_distill_task}.get(cfg.task, prepare_tokenizer_task)
    datamodule, config, model = prepare(cfg, out)
    callbacks = instantiate_dict(cfg.get("callbacks"), "callback") + [FlushLogsOnCheckpoint()]
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.ProgressBar)]
    loggers = instantiate_loggers(cfg.get("logger"), out, resume_step)
    log.info("instantiating trainer <%s>", cfg.trainer._target_)
    strategy = strategy_of(cfg, model)
    trainer: L.Trainer = instantiate(cfg.trainer, strategy=strategy, callbacks=callbacks, logger=loggers or False,
                                     plugins=[AtomicCheckpointIO()])
    check_launch(trainer, strategy)

    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    train_seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    finished = not cfg.trainer.get("fast_dev_run")

    if trainer.is_global_zero and finished:
        export_run(model.ema.shadow, config, out, kind=cfg.task)
    data_info = config["data"]
    summary = {"task": cfg.task, "data": data_info, "steps": int(trainer.global_step),
               "train_seconds": round(train_seconds, 1), "metrics": metrics, "output_dir": str(out)}
    if cfg.task == "tokenizer":
        if cfg.get("test_after_training") and finished:
            results = trainer.test(model, datamodule=datamodule, verbose=False)
            metrics.update({k: float(v) for k, v in (results[0] if results else {}).items()})
        summary.update(tokenizer=config["tokenizer"].get("name"), grid=getattr(model, "last_grid", None),
                       protocol=f"per-image PSNR/SSIM on uint8, usage/perplexity over {scored_images(cfg, datamodule)} "
                                f"({data_info['image_size']}px), EMA weights")
    elif cfg.task == "generator":
        summary.update(generator=config["generator"]["name"], tokenizer=config["tokenizer"],
                       grid=model.last_grid,
                       protocol=f"val/loss, val/acc: teacher-forced on the {cfg.data.val_split} split's token cache, "
                                "EMA weights")
        n_fid = int(config["generator"]["eval"].get("fid_samples") or 0)
        if n_fid and finished:  # every rank samples its share; the FID states are summed over ranks
            log.info("FID on %d samples ...", n_fid)
            fid = model.fid(n_fid, int(cfg.data.eval_batch_size), trainer.global_rank, trainer.world_size)
            metrics["fid"] = fid["fid"]
            summary["fid"] = fid
            if trainer.is_global_zero:
                for lg in trainer.loggers:
                    lg.log_metrics({"fid": fid["fid"]}, step=trainer.global_step)
                    lg.save()
    if trainer.is_global_zero:
        atomic_replace(lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)), out / "metrics.json")
        print_summary(summary, out)
    return metrics, {"model": model, "trainer": trainer, "datamodule": datamodule, "output_dir": out}


def scored_images(cfg: DictConfig, datamodule) -> str:
    """Which images the test metrics cover: the dataset's own description of its test split when it has one."""
    described = getattr(datamodule.test_set, "description", None)
    where = f"the whole {cfg.data.test_split} split of {cfg.data.name}"
    return f"{where}: {described}" if described else where


def print_summary(summary: dict, out: Path) -> None:
    m = summary["metrics"]
    lines = [f"run folder : {out}", f"metrics    : {out / 'metrics.json'}"]
    if summary.get("grid"):
        lines.append(f"grid       : {summary['grid']}")
    if (out / "model.safetensors").exists():
        lines.append(f"weights    : {out / 'model.safetensors'} (EMA) + config.yaml")
    for key in ("test/psnr", "test/ssim", "test/usage", "test/perplexity", "test/rfid", "val/loss", "val/acc"):
        if key in m:
            lines.append(f"{key:<11}: {m[key]:.4f}")
    if summary.get("fid"):
        lines.append(f"FID        : {summary['fid']['fid']:.3f}  [{summary['fid']['protocol']}]")
    lines.append(f"steps      : {summary['steps']} in {summary['train_seconds']} s")
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    register_resolvers()
    try:
        metrics, _ = train(cfg)
    except BaseException:
        log.exception("the run failed")  # into the run's log file, not only the terminal
        raise
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    import sys

    check_command_line("train", sys.argv[1:], HELP, check_train_config)
    main()
