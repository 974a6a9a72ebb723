"""The decoder registry: ``decoding=<name>`` resolves to ``decoding/<name>.py``.

A decoding method is one file that registers its ``generate`` function with ``@register(name, applies_to,
settings)``: the generator kinds it applies to (``model.kind``: gpt, var, flowar) and a settings dataclass
(its own knobs, validated; a misspelled key is an error listing the valid ones). Every caller (sample.py,
FID runs, benchmarks) goes through ``get_decoder(name)`` and ``Decoder.run``, which puts the model in eval
mode, checks the generator kind, counts the target forward passes (``model.forward_counter()``) and times
the call (synchronised on CUDA).

A method's ``generate(model, cond, sampling, generator, tokenizer, settings) -> (tokens, stats)`` returns
the tokens in the generator's layout and its own statistics (accepted lengths, ...); ``run`` adds
forward_passes (counted on ``model``, unless the method reports the total over several networks), tokens
(per sequence) and wall_time.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from decoding.sampling import SamplingConfig
from utils.timing import synchronize

_DECODERS: dict[str, "Decoder"] = {}
_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Decoder:
    """A registered decoding method: its name, the generator kinds it applies to, its settings and function."""

    name: str
    applies_to: tuple[str, ...]
    settings: type
    fn: Callable
    prepare_fn: Callable | None = None  # (settings, run config, device) -> settings with what they load

    def prepare(self, settings, config: dict, device):
        """Load what the settings name (another run, a neighbour table) once per sampling session and check it
        against the generator run's config; sample.py calls this after loading the run."""
        settings = self.parse_settings(settings)
        return self.prepare_fn(settings, config, device) if self.prepare_fn else settings

    def parse_settings(self, node=None):
        """The settings dataclass from a dict / DictConfig (``name`` ignored); unknown keys list the valid ones."""
        if isinstance(node, self.settings):
            return node
        values = {k: v for k, v in dict(node or {}).items() if k != "name"}
        names = [f.name for f in dataclasses.fields(self.settings) if f.init]  # init=False: loaded, not set
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"unknown decoding.{unknown[0]} for decoding={self.name}; its settings are: "
                             f"{', '.join(names) or '(none)'}")
        return self.settings(**values)

    def describe(self, settings) -> dict:
        """The user-set settings as a plain dict (for metrics.json and protocol labels)."""
        return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.init}

    def check_applies(self, model) -> None:
        kind = getattr(model, "kind", type(model).__name__)
        if kind not in self.applies_to:
            fits = ", ".join(n for n in available() if kind in get_decoder(n).applies_to)
            raise ValueError(f"decoding={self.name} applies to {', '.join(self.applies_to)} generators, not to this "
                             f"{kind} run; decoders for {kind}: {fits}")

    @torch.no_grad()
    def run(self, model, cond: torch.Tensor, sampling=None, generator: torch.Generator | None = None,
            tokenizer=None, settings=None):
        """Sample for labels cond (B,) -> (tokens, stats): the method's stats plus forward_passes (counted per
        sequence batch), tokens (per sequence) and wall_time (seconds)."""
        self.check_applies(model)
        sampling, settings = SamplingConfig.from_any(sampling), self.parse_settings(settings)
        was_training = model.training
        model.eval()  # important! (no label dropout)
        synchronize(cond.device)
        t0 = time.perf_counter()
        try:
            with model.forward_counter() as counter:
                tokens, stats = self.fn(model, cond, sampling, generator, tokenizer, settings)
        finally:
            model.train(was_training)
        synchronize(cond.device)
        # a method that runs more than one network reports its own total forward_passes
        stats = {"forward_passes": counter.count, **(stats or {}), "tokens": model.num_tokens,
                 "wall_time": time.perf_counter() - t0}
        return tokens, stats


def register(name: str, applies_to, settings: type, prepare: Callable | None = None):
    """Decorator: register ``generate(model, cond, sampling, generator, tokenizer, settings)`` as ``name``.

    ``prepare(settings, run config, device) -> settings``: optional, loads what the settings refer to.
    """
    def wrap(fn):
        _DECODERS[name] = Decoder(name, tuple(applies_to), settings, fn, prepare)
        return fn
    return wrap


def available() -> list[str]:
    """Names of the decoding methods: the files of decoding/ that register one."""
    return sorted(p.stem for p in _HERE.glob("*.py") if re.search(r"^@register\(", p.read_text(), re.M))


def get_decoder(name: str) -> Decoder:
    """The registered method ``name`` (imports decoding/<name>.py); an unknown name lists the available ones."""
    if name not in _DECODERS:
        if name not in available():
            raise ValueError(f"unknown decoding={name}; available: {', '.join(available())}")
        importlib.import_module(f"decoding.{name}")
    return _DECODERS[name]
