"""Atomic checkpoint writes, the exported run folder (model.safetensors + config.yaml), and safe loading.

A run folder looks like outputs/<task>/<time>/ with checkpoints/{last,best}.ckpt, and after
training model.safetensors (EMA weights) and config.yaml (the resolved config). Nothing is ever
unpickled: .ckpt files load with weights_only=True, weights from safetensors.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric.plugins import TorchCheckpointIO
from safetensors.torch import load_file, save_model


def atomic_replace(write, path: str | Path) -> None:
    """Call write(tmp_path) on a temp file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes to a temp file and renames it: a killed save leaves the old file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_replace(lambda tmp: torch.save(checkpoint, tmp), path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def export_run(model: torch.nn.Module, config: dict, run_dir: str | Path, kind: str) -> Path:
    """Write model.safetensors and config.yaml (with `kind`) into run_dir, atomically."""
    run_dir = Path(run_dir)
    config = dict(config, kind=kind)
    atomic_replace(lambda tmp: save_model(strip_compile_prefix(model), tmp), run_dir / "model.safetensors")
    atomic_replace(lambda tmp: Path(tmp).write_text(yaml.safe_dump(config, sort_keys=False)), run_dir / "config.yaml")
    return run_dir / "model.safetensors"


def strip_compile_prefix(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile wraps modules as _orig_mod; export the original."""
    return getattr(model, "_orig_mod", model)


class CheckpointError(ValueError):
    """A checkpoint that is missing, of the wrong kind, or incompatible with the settings."""


def resolve_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """A run folder, its model.safetensors, or a .ckpt -> (config with 'kind', EMA state dict, run folder).

    From a .ckpt the EMA weights (`ema.shadow.*`) are used when present, else the live ones.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist; pass ckpt=<run folder> (outputs/<task>/<time>) "
                              "or a .ckpt / model.safetensors inside one")
    if p.is_dir():
        if (p / "model.safetensors").exists():
            p = p / "model.safetensors"
        elif (p / "checkpoints" / "last.ckpt").exists():
            p = p / "checkpoints" / "last.ckpt"
        else:
            raise CheckpointError(f"{p} holds neither model.safetensors nor checkpoints/last.ckpt; is it a tokar run "
                                  "folder?")
    if p.suffix == ".safetensors":
        run_dir = p.parent
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.exists():
            raise CheckpointError(f"{cfg_path} is missing; model.safetensors needs the config.yaml written beside it")
        return yaml.safe_load(cfg_path.read_text()), load_file(str(p)), run_dir
    if p.suffix == ".ckpt":
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - corrupt or foreign file
            raise CheckpointError(f"cannot read checkpoint {p}: {e}") from e
        hp = ckpt.get("hyper_parameters", {})
        if "config" not in hp:
            raise CheckpointError(f"{p} is not a tokar checkpoint (no hyper_parameters.config)")
        state = ckpt["state_dict"]
        ema = {k[len("ema.shadow."):]: v for k, v in state.items() if k.startswith("ema.shadow.")}
        live = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        run_dir = p.parent.parent if p.parent.name == "checkpoints" else p.parent
        return hp["config"], ema or live, run_dir
    raise CheckpointError(f"{p} is not a run folder, .ckpt or .safetensors file")


def expect_kind(config: dict, kind: str, path) -> None:
    """Raise a CheckpointError unless the checkpoint's config says it is a `kind` checkpoint."""
    got = config.get("kind")
    if got != kind:
        raise CheckpointError(f"{path} is a {got or 'unknown'} checkpoint, but a {kind} checkpoint is needed here")


def load_weights(model: torch.nn.Module, state: dict, path) -> None:
    """Strict load, with an error that names what does not match."""
    result = model.load_state_dict(state, strict=False)
    shapes = [k for k, v in state.items() if k in model.state_dict() and model.state_dict()[k].shape != v.shape]
    if result.missing_keys or result.unexpected_keys or shapes:
        raise CheckpointError(f"weights in {path} do not match the config beside them: missing "
                              f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")


def load_tokenizer(ckpt: str | Path, device: torch.device | str = "cpu"):
    """(Tokenizer in eval mode, run config) from a tokenizer run folder, .ckpt or model.safetensors."""
    from tokenizers.module import build_tokenizer

    config, state, _ = resolve_checkpoint(ckpt)
    expect_kind(config, "tokenizer", ckpt)
    model = build_tokenizer(config["tokenizer"], config["data"]["channels"])
    try:
        load_weights(model, state, ckpt)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {ckpt} do not fit the tokenizer config beside them: {e}") from e
    return model.to(device).eval(), config


def load_generator(ckpt, device: torch.device | str = "cpu", tokenizer_path: str | None = None):
    """(generator in eval mode, its frozen tokenizer, run config) from a generator run, .ckpt or model.safetensors.

    The tokenizer run named in the config (or ``tokenizer_path``, e.g. after moving it) must exist and have the
    hash the generator was trained with (CheckpointError otherwise).
    """
    from data.token_cache import load_tokenizer_run
    from generators.module import build_generator

    config, state, _ = resolve_checkpoint(ckpt)
    if config.get("kind") != "distill":  # a distill run (task=distill) loads like a generator run
        expect_kind(config, "generator", ckpt)
    tok = config.get("tokenizer") or {}
    path = tokenizer_path or tok.get("path")
    if not path or not Path(path).exists():
        raise CheckpointError(f"the tokenizer run this generator was trained on ({path}) is missing; {ckpt} cannot "
                              "turn its codes into images without it (moved? pass tokenizer_ckpt=<its new folder>)")
    tokenizer = load_tokenizer_run(path, device, expected_hash=tok.get("hash")).model
    model = build_generator(config)
    try:
        load_weights(model, state, ckpt)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {ckpt} do not fit the generator config beside them: {e}") from e
    return model.to(device).eval(), tokenizer, config


def check_same_tokenizer(config: dict, other: dict, what: str, path, other_path) -> None:
    """A CheckpointError unless two generator runs read the same tokenizer (by hash) of the same dataset."""
    mine, theirs = (config.get("tokenizer") or {}).get("hash"), (other.get("tokenizer") or {}).get("hash")
    if not mine or mine != theirs:
        raise CheckpointError(f"{what} {other_path} was trained on tokenizer {theirs} "
                              f"({(other.get('tokenizer') or {}).get('path')}), but {path} on {mine} "
                              f"({(config.get('tokenizer') or {}).get('path')}); both must share one tokenizer")
    data, odata = config.get("data") or {}, other.get("data") or {}
    keys = ("name", "image_size", "num_classes", "settings")
    if any(data.get(k) != odata.get(k) for k in keys):
        raise CheckpointError(f"{what} {other_path} was trained on {odata.get('name')} "
                              f"({odata.get('num_classes')} classes, {odata.get('image_size')} px), {path} on "
                              f"{data.get('name')} ({data.get('num_classes')} classes, {data.get('image_size')} px)")
