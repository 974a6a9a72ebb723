"""Image conversions shared by every dataset: PIL/uint8 <-> float tensors in [-1, 1]."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def pil_to_tensor(img: Image.Image, image_size: int, channels: int) -> torch.Tensor:
    """PIL image -> (C, S, S) float in [-1, 1]: resize the short side to S (bicubic), center-crop."""
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    scale = image_size / min(w, h)
    if scale != 1:
        img = img.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - image_size) // 2, (h - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    arr = np.asarray(img, dtype=np.uint8)
    return uint8_to_float(torch.from_numpy(arr.copy()).reshape(image_size, image_size, channels).permute(2, 0, 1))


def uint8_to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float in [-1, 1]."""
    return x.float() / 127.5 - 1.0


def float_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 in [0, 255], rounded as when saving a PNG."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
