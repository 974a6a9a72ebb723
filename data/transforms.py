"""Image conversions shared by every dataset: PIL/uint8 <-> float tensors in [-1, 1]."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class UnsupportedImageError(ValueError):
    """An image whose PIL mode tokar cannot convert to 8-bit gray or RGB."""


def to_8bit(img: Image.Image, channels: int, name: str = "image") -> Image.Image:
    """Any PIL mode -> 8-bit 'L' (channels=1) or 'RGB' with the image's true value range.

    16-bit gray (I;16, I;16B, I;16L, and I, as 16-bit PNG/TIFF load) is scaled from [0, 65535], float (F) from
    [0, 1]; PIL's own convert would clip both at 255 (a white image). CMYK, palette (with transparency), LA,
    RGBA and 16-bit RGB (which PIL reads as 8-bit RGB) go through PIL's conversion, alpha dropped.
    """
    mode = img.mode
    target = "L" if channels == 1 else "RGB"
    try:
        if mode == "F" or mode == "I" or mode.startswith("I;16"):
            peak = 1.0 if mode == "F" else 65535.0
            arr = np.asarray(img, dtype=np.float64)  # (H, W)
            gray = Image.fromarray(np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8), "L")
            return gray.convert(target)
        if mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # PIL warns about palette transparency otherwise
        return img.convert(target)
    except (ValueError, OSError, TypeError) as e:
        raise UnsupportedImageError(f"cannot convert {name} (PIL mode {mode}) to {target}: {e}; save it as an 8- or "
                                    "16-bit gray / RGB PNG, or remove it from the folder") from None


def pil_to_tensor(img: Image.Image, image_size: int, channels: int, name: str = "image") -> torch.Tensor:
    """PIL image -> (C, S, S) float in [-1, 1]: convert (`to_8bit`), resize the short side to S (bicubic),
    center-crop."""
    img = to_8bit(img, channels, name)
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
