"""Hydra helpers: resolvers, instantiating callback/logger dicts, and run-folder rules."""
from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("tokar")


def run_dir(log_dir: str, task_name: str, ckpt_path: str | None = None) -> str:
    """A new outputs/<task>/<time>/ folder, or the run folder of the checkpoint being resumed."""
    if ckpt_path:
        p = Path(str(ckpt_path)).expanduser().resolve()
        if p.is_dir():  # ckpt_path=<run folder> resumes its checkpoints/last.ckpt
            return str(p)
        if p.parent.name == "checkpoints":
            return str(p.parent.parent)
    return str(Path(log_dir) / task_name / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f"))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_dir"):
        OmegaConf.register_new_resolver("run_dir", run_dir)


register_resolvers()


def instantiate_dict(cfg: DictConfig | None, what: str) -> list:
    """Instantiate every entry with a _target_ (so `callbacks=none` or `logger=null` switches them off)."""
    out = []
    if not cfg:
        return out
    for name, node in cfg.items():
        if isinstance(node, DictConfig) and "_target_" in node:
            log.info("instantiating %s <%s>", what, node._target_)
            out.append(instantiate(node))
    return out


def compose_with_hydra(config_name: str, overrides: list[str], output_dir: str | Path | None = None):
    """The one Hydra composition outside @hydra.main (tests, benchmarks, the entry scripts' checks).

    With output_dir the hydra node is kept and set as a run in output_dir (what train()/run() read); without
    it the plain job config comes back and nothing is set globally.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    register_resolvers()
    root = Path(__file__).resolve().parents[1]
    GlobalHydra.instance().clear()
    extra = [f"hydra.run.dir={output_dir}"] if output_dir is not None else []
    try:
        with initialize_config_dir(config_dir=str(root / "configs"), version_base="1.3"):
            cfg = compose(config_name, overrides=[*overrides, *extra], return_hydra_config=output_dir is not None)
    finally:
        if output_dir is None:
            GlobalHydra.instance().clear()
    if output_dir is None:
        return cfg
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(root)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg
