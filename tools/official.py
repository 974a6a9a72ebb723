"""What every official-checkpoint import shares: safe reading, strict key remapping, the taming autoencoder walk,
and writing the tokenizer run + generator run exactly as tokar's training exports them.

A key map is ``{tokar key: (official key, ...)}``; several official keys are concatenated along dim 0 (LlamaGen's
separate q, k, v 1x1 convs -> tokar's fused qkv conv). Every official key must be used or explicitly ignored,
every tokar key must be mapped or be a tokar-only buffer, and every shape must fit; otherwise an
``OfficialCheckpointError`` names the key and the problem.
"""
from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import torch
import yaml
from torch import nn

from utils.checkpoint import export_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class OfficialCheckpointError(ValueError):
    """An official checkpoint that cannot be imported: unreadable, pickled objects, missing/extra keys, bad shapes."""


#################################################################################
#                                  Reading                                      #
#################################################################################

def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint file -> its state_dict, never unpickling arbitrary objects.

    ``.safetensors`` or a torch file loaded with ``weights_only=True``: a plain state_dict (VAR) or a dict holding
    it under "model", "module" or "state_dict" (LlamaGen's {"model": state_dict}). The one class allowed beyond
    tensors and containers is ``argparse.Namespace`` (the "args" entry of the official training checkpoints), whose
    attributes go through the same restricted unpickler.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise OfficialCheckpointError(f"checkpoint {p} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(p))
    else:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise OfficialCheckpointError(
                f"{p} holds pickled Python objects that a safe load (torch.load(weights_only=True)) refuses: "
                f"{str(e).splitlines()[0][:300]}. tokar never unpickles arbitrary code; re-save the weights as a plain "
                "state_dict (torch.save(model.state_dict(), path)) or as .safetensors") from e
        except Exception as e:
            raise OfficialCheckpointError(f"cannot read {p} as a torch checkpoint: {e}") from e
    if isinstance(obj, dict):
        for wrapper in ("model", "module", "state_dict"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        raise OfficialCheckpointError(f"{p} holds a {type(obj).__name__}, not a state_dict (a dict of tensors)")
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise OfficialCheckpointError(f"{p}: entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}, not a tensor; "
                                      "expected a state_dict")
    return obj


def require(state: dict, key: str, source) -> torch.Tensor:
    """state[key], or an error naming the missing key."""
    if key not in state:
        raise OfficialCheckpointError(f"{source}: missing key {key!r}; is this the right checkpoint for this format?")
    return state[key]


def indices_under(state: dict, prefix: str) -> list[int]:
    """The sorted integers i of keys ``<prefix>.<i>.*`` (module-list entries)."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pat.match(k))})


#################################################################################
#                                  Remapping                                    #
#################################################################################

def remap(official: dict, key_map: dict[str, tuple[str, ...]], model: nn.Module, source,
          ignored=(), tokar_only=()) -> dict[str, torch.Tensor]:
    """Official state -> tokar state_dict for ``model``, loaded strictly; errors name the key and the problem.

    ignored: official keys (regexes) dropped on purpose (training statistics, buffers checked elsewhere).
    tokar_only: tokar keys (regexes) with no official counterpart, kept from the freshly built model.
    """
    used = {o for keys in key_map.values() for o in keys}
    missing = [o for o in dict.fromkeys(o for keys in key_map.values() for o in keys) if o not in official]
    if missing:
        raise OfficialCheckpointError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing in all: "
                                      f"{missing[:5]}); the checkpoint does not fit the architecture read from it")
    unexpected = [k for k in official if k not in used and not any(re.fullmatch(p, k) for p in ignored)]
    if unexpected:
        raise OfficialCheckpointError(f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} in all: "
                                      f"{unexpected[:5]}); it has no place in the architecture read from the "
                                      "checkpoint")
    own = model.state_dict()
    unmapped = [k for k in own if k not in key_map and not any(re.fullmatch(p, k) for p in tokar_only)]
    if unmapped:  # a bug in the importer, not in the file
        raise RuntimeError(f"tokar keys without an official source: {unmapped[:5]}")
    state = {}
    for key, value in own.items():
        if key not in key_map:
            state[key] = value
            continue
        parts = [official[o] for o in key_map[key]]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if tensor.shape != value.shape:
            names = " + ".join(repr(o) for o in key_map[key])
            raise OfficialCheckpointError(f"{source}: key {names} has shape {tuple(tensor.shape)}, but the "
                                          f"architecture read from the checkpoint needs {tuple(value.shape)} "
                                          f"(tokar {key!r})")
        state[key] = tensor.to(value.dtype)
    model.load_state_dict(state, strict=True)
    return state


def module_map(official_prefix: str, tokar_prefix: str, module: nn.Module, official: dict) -> dict:
    """The key map of one module: its parameters and persistent buffers, official names from ``NAMES``.

    ``NAMES[type]`` lists (official suffix or suffixes, tokar suffix); a tuple of official suffixes is concatenated.
    """
    from tokenizers.autoencoder import AttnBlock, ResBlock

    names = {
        nn.Conv2d: [("", "")], nn.GroupNorm: [("", "")],
        ResBlock: [("norm1", "block.0"), ("conv1", "block.2"), ("norm2", "block.3"), ("conv2", "block.6"),
                   ("nin_shortcut", "skip")],
        # VAR fuses q, k, v into one 1x1 conv; LlamaGen has three (concatenated in q, k, v order)
        AttnBlock: [("norm", "norm"), (("q", "k", "v") if f"{official_prefix}.q.weight" in official else "qkv", "qkv"),
                    ("proj_out", "proj_out")],
    }[type(module)]
    own = set(module.state_dict())
    out = {}
    for off, tok in names:
        for param in ("weight", "bias"):
            tok_key = f"{tok}.{param}" if tok else param
            if tok_key not in own:
                continue
            offs = off if isinstance(off, tuple) else (off,)
            out[f"{tokar_prefix}.{tok_key}"] = tuple(f"{official_prefix}.{o}.{param}" if o else
                                                     f"{official_prefix}.{param}" for o in offs)
    return out


def autoencoder_map(tokenizer: nn.Module, encoder_names: list[str], decoder_names: list[str], official: dict,
                    source) -> dict:
    """Key map of a taming-layout encoder and decoder: official module names in forward order, zipped with the
    tokar modules that hold parameters (``Encoder.net`` / ``Decoder.net`` + ``conv_out``) in forward order."""
    units = {
        "encoder": [(f"encoder.net.{i}", m) for i, m in enumerate(tokenizer.encoder.net) if len(m.state_dict())],
        "decoder": [(f"decoder.net.{i}", m) for i, m in enumerate(tokenizer.decoder.net) if len(m.state_dict())]
        + [("decoder.conv_out", tokenizer.decoder.conv_out)],
    }
    out = {}
    for part, names in (("encoder", encoder_names), ("decoder", decoder_names)):
        if len(names) != len(units[part]):  # a bug in the importer's layout reading
            raise RuntimeError(f"{part}: {len(names)} official modules vs {len(units[part])} tokar modules")
        for name, (prefix, module) in zip(names, units[part]):
            out.update(module_map(f"{part}.{name}", prefix, module, official))
    return out


#################################################################################
#                                   Writing                                     #
#################################################################################

def config_node(group: str, name: str) -> dict:
    """A config group file of configs/ as a plain dict (the base of an imported run's node)."""
    node = yaml.safe_load((CONFIGS / group / f"{name}.yaml").read_text())
    node.pop("defaults", None)
    return node


def write_runs(out: str | Path, tokenizer: nn.Module, tokenizer_config: dict, generator: nn.Module,
               generator_config: dict, overwrite: bool = False) -> Path:
    """Write the tokenizer run to <out>/tokenizer and the generator run to <out> (linked by the tokenizer's hash).

    Both are ordinary tokar run folders (model.safetensors + config.yaml, atomic writes), so
    ``python sample.py ckpt=<out>`` samples from the generator, ``tokenizer_ckpt=<out>/tokenizer`` trains on its tokens.
    """
    from utils.runs import run_hash

    out = Path(out).expanduser().resolve()
    if not overwrite and ((out / "model.safetensors").exists() or (out / "tokenizer" / "model.safetensors").exists()):
        raise FileExistsError(f"{out} already holds an imported run; pass --overwrite or another --out")
    tok_dir = out / "tokenizer"
    export_run(tokenizer, tokenizer_config, tok_dir, "tokenizer")
    generator_config = dict(generator_config)
    generator_config["tokenizer"] = {"path": str(tok_dir), "hash": run_hash(tok_dir),
                                     "name": tokenizer_config["tokenizer"]["name"]}
    export_run(generator, generator_config, out, "generator")
    return out


def imagenet_data(image_size: int, num_classes: int) -> dict:
    """The data node of an imported ImageNet class-conditional run."""
    return {"name": "imagenet", "image_size": int(image_size), "channels": 3, "num_classes": int(num_classes),
            "settings": {}}
