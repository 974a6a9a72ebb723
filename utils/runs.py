"""Loading any tokar run, in one place: find its files, check its kind, follow its hash link, build its model.

A run folder (outputs/<task>/<time>/) holds checkpoints/{last,best}.ckpt while it trains and, once finished,
model.safetensors (EMA weights) + config.yaml. `load_run` takes the folder or any of those files:

    tok = load_run("outputs/tokenizer/<time>", kind="tokenizer")        # Run(kind, config, model, path, hash, ...)
    gen = load_run("outputs/generator/<time>", kind="generator")        # gen.tokenizer: the Run its codes belong to

A generator's config records the tokenizer run it learned (path + hash = sha256 of that run's model.safetensors
and config.yaml); loading the generator loads that tokenizer and refuses one whose hash changed. Nothing is
unpickled (.ckpt with weights_only=True, weights from safetensors), and every failure is a CheckpointError that
names the file and what to do.
"""
from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from utils.checkpoint import CheckpointError

KINDS = ("tokenizer", "generator", "drafter", "distill")
EXPORTED = ("model.safetensors", "config.yaml")
RUN_HINT = "pass a run folder (outputs/<task>/<time>) or a .ckpt / model.safetensors inside one"


@dataclass
class Run:
    """A loaded run: its model in eval mode, config, folder, the file the weights came from, and its hash."""

    kind: str
    config: dict
    model: torch.nn.Module
    path: Path
    file: Path
    hash: str | None  # sha256 of model.safetensors + config.yaml; None for a run that has not exported them yet
    tokenizer: "Run | None" = None  # a generator's (drafter's, student's) tokenizer run

    @property
    def run_dir(self) -> Path:
        return self.path


# -- files ------------------------------------------------------------------------------------------
def run_folder(path: str | Path) -> Path:
    """The run folder of a run folder, of a file in it, or of a .ckpt in its checkpoints/."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


def weights_file(path: str | Path) -> Path:
    """The file to load: a run folder gives model.safetensors (else checkpoints/last.ckpt); a file is itself."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p} does not exist; {RUN_HINT}")
    if p.is_dir():
        for candidate in (p / "model.safetensors", p / "checkpoints" / "last.ckpt"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{p} holds neither model.safetensors nor checkpoints/last.ckpt; is it a tokar run "
                              f"folder? {RUN_HINT}")
    if p.suffix not in (".ckpt", ".safetensors"):
        raise CheckpointError(f"{p} is not a run folder, .ckpt or .safetensors file; {RUN_HINT}")
    return p


def resume_checkpoint(path: str | Path) -> Path:
    """The .ckpt that ckpt_path=<run folder | .ckpt> resumes: a folder gives its checkpoints/last.ckpt."""
    p = Path(path).expanduser()
    if p.is_dir():
        last = p / "checkpoints" / "last.ckpt"
        if not last.is_file():
            found = sorted(str(c) for c in (p / "checkpoints").glob("*.ckpt")) if (p / "checkpoints").is_dir() else []
            raise CheckpointError(f"ckpt_path={p} is a folder without checkpoints/last.ckpt; pass a run folder that "
                                  "holds one, or one of its .ckpt files" + (f" ({', '.join(found)})" if found else ""))
        return last
    if not p.exists():
        raise CheckpointError(f"ckpt_path={p} does not exist; pass the run folder or its checkpoints/last.ckpt")
    if p.suffix != ".ckpt":
        raise CheckpointError(f"ckpt_path={p} is not a .ckpt: resuming needs the training state in "
                              "checkpoints/last.ckpt (model.safetensors holds only the EMA weights); pass the run folder")
    return p


def run_hash(path: str | Path) -> str:
    """sha256 (hex) of a finished run's model.safetensors followed by its config.yaml."""
    folder = run_folder(path)
    h = hashlib.sha256()
    for name in EXPORTED:
        with open(folder / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def is_exported(path: str | Path) -> bool:
    folder = run_folder(path)
    return all((folder / n).is_file() for n in EXPORTED)


def torch_checkpoint(path: str | Path) -> dict:
    """torch.load(weights_only=True) of a .ckpt, with a CheckpointError naming the file and the fix."""
    p = Path(path)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # its message advises weights_only=False: never pass that on
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(f"cannot read checkpoint {p}: it holds Python objects ({found.group(1)}) that tokar "
                                  "never unpickles, so it was not written by a tokar run; pass a tokar run's "
                                  "checkpoint") from None
        raise CheckpointError(f"cannot read checkpoint {p}: it is corrupt or not a torch checkpoint; pass the run's "
                              "other checkpoint (checkpoints/last.ckpt or best.ckpt) or its folder") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {p}: it is truncated or corrupt ({str(e).split('.')[0]}); "
                              "pass the run's other checkpoint (checkpoints/last.ckpt or best.ckpt) or its folder") from None


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], Path, Path]:
    """A run folder, its model.safetensors, or a .ckpt -> (config with 'kind', EMA state dict, run folder, file).

    From a .ckpt the EMA weights (`ema.shadow.*`) are used when present, else the live ones.
    """
    p = weights_file(path)
    folder = run_folder(p)
    if p.suffix == ".safetensors":
        cfg_path = folder / "config.yaml"
        if not cfg_path.exists():
            raise CheckpointError(f"{cfg_path} is missing; {p} needs the config.yaml written beside it")
        try:
            config = yaml.safe_load(cfg_path.read_text()) or {}
        except yaml.YAMLError as e:
            raise CheckpointError(f"cannot read {cfg_path}: it is not valid YAML ({e.__class__.__name__}); restore "
                                  "it, or export the run again by resuming it") from None
        try:
            state = load_file(str(p))
        except SafetensorError as e:
            raise CheckpointError(f"cannot read {p}: it is truncated or corrupt ({e}); export it again by resuming "
                                  f"the run (ckpt_path={folder}) or load {folder / 'checkpoints' / 'last.ckpt'}") from None
        return config, state, folder, p
    ckpt = torch_checkpoint(p)
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "config" not in hp:
        raise CheckpointError(f"{p} is not a tokar checkpoint (no hyper_parameters.config); {RUN_HINT}")
    state = ckpt["state_dict"]
    ema = {k[len("ema.shadow."):]: v for k, v in state.items() if k.startswith("ema.shadow.")}
    live = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return hp["config"], ema or live, folder, p


# -- kinds ------------------------------------------------------------------------------------------
def check_kind(config: dict, kind: str | None, path, role: str | None = None) -> str:
    """The run's kind; a CheckpointError naming what it is and what was needed when it is not `kind`."""
    got = config.get("kind")
    if got not in KINDS:
        raise CheckpointError(f"{path} has no known run kind ({got!r}; one of {', '.join(KINDS)}): its config.yaml is "
                              "not a tokar run's")
    if kind is not None and got != kind:
        where = f" for {role}" if role else ""
        raise CheckpointError(f"{path} is a {got} run, not a {kind} run; pass a {kind} run{where} "
                              f"(outputs/{kind}/<time>)")
    return got


def build_model(kind: str, config: dict) -> torch.nn.Module:
    """The untrained network a run of `kind` describes."""
    if kind == "tokenizer":
        from tokenizers.module import build_tokenizer

        return build_tokenizer(config["tokenizer"], config["data"]["channels"])
    if kind in ("generator", "distill"):  # a distilled student is a generator of its own kind
        from generators.module import build_generator

        return build_generator(config)
    if kind == "drafter":
        from generators.draft_head import DraftHead

        return DraftHead(**config["model_args"])
    raise CheckpointError(f"loading {kind} runs is not available yet")


def load_weights(model: torch.nn.Module, state: dict, path) -> None:
    """Strict load, with an error that names what does not match."""
    own = model.state_dict()
    result = model.load_state_dict({k: v for k, v in state.items() if k not in own or own[k].shape == v.shape},
                                   strict=False)
    shapes = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if result.missing_keys or result.unexpected_keys or shapes:
        raise CheckpointError(f"weights in {path} do not match the config beside them: missing "
                              f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}, other shapes "
                              f"{shapes[:5]}; keep a run's files together as training wrote them")


# -- the loader -------------------------------------------------------------------------------------
def load_run(path: str | Path, kind: str | None = None, device: torch.device | str = "cpu",
             expected_hash: str | None = None, tokenizer_path: str | Path | None = None,
             exported: bool = False, role: str | None = None, used_by: str | None = None) -> Run:
    """Load a run (frozen, eval mode) from its folder or a file in it; see the module docstring.

    kind: the kind needed (None = any). expected_hash: the hash a dependent run recorded (implies exported).
    tokenizer_path: a generator's tokenizer run when it moved (its hash must still match). exported: refuse a
    run that has not written model.safetensors + config.yaml. role: names the argument in errors; used_by: the kind
    of the run that recorded expected_hash.
    """
    config, state, folder, file = read_checkpoint(path)
    got = check_kind(config, kind, path, role)
    digest = None
    if exported or expected_hash is not None:
        missing = [n for n in EXPORTED if not (folder / n).is_file()]
        if missing:
            hint = (" It holds only checkpoints: the run did not finish; resume it (ckpt_path=<its folder>) so it "
                    "exports its weights" if (folder / "checkpoints").is_dir() else "")
            raise CheckpointError(f"{folder} is not a finished {got} run: {' and '.join(missing)} missing.{hint}")
    if is_exported(folder):
        digest = run_hash(folder)
    if expected_hash is not None and digest != expected_hash:
        user = used_by or "run that uses it"
        raise CheckpointError(f"the {got} run {folder} changed since the {user} was trained on it (hash "
                              f"{expected_hash[:12]}, now {digest[:12]}): its codes no longer mean what the {user} "
                              f"learned. Restore that {got} run, or train the {user} again on this one")
    model = build_model(got, config)
    load_weights(model, state, file)
    model = model.to(device).eval().requires_grad_(False)
    run = Run(got, config, model, folder.resolve(), file, digest)
    if got in ("generator", "drafter", "distill"):
        run.tokenizer = load_tokenizer_of(config, path, device, tokenizer_path)
    return run


def load_tokenizer_of(config: dict, path, device, tokenizer_path=None) -> Run:
    """The tokenizer run a generator's config names (or `tokenizer_path`), hash-checked."""
    tok = config.get("tokenizer") or {}
    where = tokenizer_path or tok.get("path")
    if not where or not Path(where).expanduser().exists():
        raise CheckpointError(f"the tokenizer run this {config.get('kind')} was trained on ({where}) is missing; "
                              f"{path} cannot turn its codes into images without it (moved? pass "
                              "tokenizer_ckpt=<its new folder>)")
    return load_run(where, "tokenizer", device, expected_hash=tok.get("hash"), role="tokenizer_ckpt",
                    used_by=config.get("kind"))


def load_generator(path, device: torch.device | str = "cpu", tokenizer_path: str | None = None):
    """(generator in eval mode, its frozen tokenizer, run config) of a generator (or distilled student) run."""
    config, _, _, _ = read_checkpoint(path)
    kind = "distill" if config.get("kind") == "distill" else "generator"  # else: the kind error names both
    run = load_run(path, kind, device, tokenizer_path=tokenizer_path, role="ckpt")
    return run.model, run.tokenizer.model, run.config


def check_same_tokenizer(config: dict, other: dict, what: str, path, other_path) -> None:
    """A CheckpointError unless two generator runs read the same tokenizer (by hash) of the same dataset.

    what / other_path: the run being checked ("the refiner", its folder); path: the run it must match.
    """
    mine, theirs = (config.get("tokenizer") or {}).get("hash"), (other.get("tokenizer") or {}).get("hash")
    if not mine or mine != theirs:
        raise CheckpointError(f"{what} {other_path} was trained on tokenizer {theirs} "
                              f"({(other.get('tokenizer') or {}).get('path')}), but {path} on {mine} "
                              f"({(config.get('tokenizer') or {}).get('path')}); both must share one tokenizer")
    data, odata = config.get("data") or {}, other.get("data") or {}
    if any(data.get(k) != odata.get(k) for k in ("name", "image_size", "num_classes", "settings")):
        raise CheckpointError(f"{what} {other_path} was trained on {odata.get('name')} "
                              f"({odata.get('num_classes')} classes, {odata.get('image_size')} px), {path} on "
                              f"{data.get('name')} ({data.get('num_classes')} classes, {data.get('image_size')} px)")
