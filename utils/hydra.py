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


# -- checks before Hydra starts a run (no output folder is made for a command line that cannot run) ----------
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
HIDDEN_GROUPS = {"hydra", "paths", "local"}  # internal: Hydra's settings, folder layout, machine-local overrides


def group_options(group: str) -> list[str]:
    """The options of a config group a user may pick (files starting with `_` are shared pieces, not options)."""
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml") if not p.stem.startswith("_"))


def user_groups(config_name: str) -> list[str]:
    """The config groups of `config_name`'s defaults list a user may set."""
    import yaml

    defaults = yaml.safe_load((CONFIGS / f"{config_name}.yaml").read_text()).get("defaults", [])
    names = [next(iter(d)).replace("optional ", "") for d in defaults if isinstance(d, dict)]
    return [g for g in names if g not in HIDDEN_GROUPS and not g.startswith("_") and (CONFIGS / g).is_dir()]


def help_text(config_name: str, intro: str) -> str:
    """`--help` of an entry script: what it does, its groups with their options, how to see every key."""
    lines = [intro.strip(), "", "Config groups (group=option):"]
    lines += [f"  {g:<11} {', '.join(group_options(g))}" for g in user_groups(config_name)]
    lines += ["", "Every key=value of the composed config can be overridden; print them all with",
              f"  python {'train' if config_name == 'train' else 'sample'}.py --cfg job [overrides]",
              "Hydra's own flags: --hydra-help"]
    return "\n".join(lines)


def command_line_overrides(argv: list[str]) -> list[str] | None:
    """The key=value overrides of a command line; None for a multirun (sweeps are checked per job by Hydra)."""
    if any(a in ("-m", "--multirun") for a in argv):
        return None
    return [a for a in argv if "=" in a and not a.startswith("-")]


def unknown_key_message(config_name: str, overrides: list[str], bad: str) -> str:
    """'<key> is not a key of the config' with the closest valid key, found in the config without the bad override."""
    import difflib

    from omegaconf import DictConfig

    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != bad]
    parent, _, leaf = bad.rpartition(".")
    try:
        cfg = compose_with_hydra(config_name, rest)
        node = OmegaConf.select(cfg, parent) if parent else cfg
        keys = [f"{parent}.{k}" if parent else str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    except Exception:  # noqa: BLE001 - another override is bad too: fall back to the message without a suggestion
        keys = []
    close = difflib.get_close_matches(bad, keys, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]}?" if close else ""
    return (f"{bad} is not a key of the {config_name} config.{hint} `python {config_name}.py --cfg job` prints "
            "every key (a `+` adds a new key, which no tokar code would read).")


def check_command_line(config_name: str, argv: list[str], intro: str, check=None) -> None:
    """Before @hydra.main: answer --help, and compose + `check(cfg)` the command line, so that a command line that
    cannot run exits with one clear message and leaves no output folder behind."""
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(config_name, intro))
        raise SystemExit(0)
    overrides = command_line_overrides(argv)
    if overrides is None:
        return
    from hydra.errors import HydraException

    try:
        cfg = compose_with_hydra(config_name, overrides)
    except HydraException as e:
        import re

        found = re.search(r"Could not override '([^']+)'", str(e))
        if found and "not in struct" in str(e.__cause__):
            raise SystemExit(f"error: {unknown_key_message(config_name, overrides, found.group(1))}") from None
        message = str(e).split("\nConfig search path:")[0].strip()  # the search path says nothing to a user
        raise SystemExit(f"error: {message}") from None
    if check is not None:
        try:
            check(cfg)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None


# -- value ranges -------------------------------------------------------------------------------------------
def check_ranges(cfg: DictConfig, ranges: dict[str, tuple]) -> None:
    """A ValueError naming the first key whose value is outside its range; `ranges` maps a dotted key to
    (low, low inclusive, high, high inclusive), a bound None = open; null values are skipped."""
    for key, (lo, lo_in, hi, hi_in) in ranges.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={value} is not a number") from None
        bad = (lo is not None and (x < lo or (x == lo and not lo_in))) or \
              (hi is not None and (x > hi or (x == hi and not hi_in)))
        if bad:
            if lo is not None and hi is not None:
                want = f"in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
            elif lo is not None:
                want = f"{'>=' if lo_in else '>'} {lo:g}"
            else:
                want = f"{'<=' if hi_in else '<'} {hi:g}"
            raise ValueError(f"{key}={value} is out of range: it must be {want}")
