"""Row labels on saved image grids: class names beside a generator's rows, original / reconstruction beside a
tokenizer's. The labels are also stored in the PNG's text chunk `rows` (JSON), for tools and tests."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo


def label_rows(path: str | Path, labels: list[str], padding: int = 1) -> Path:
    """Add a left margin naming each row of the grid PNG at `path` (rows as torchvision's save_image lays them
    out with `padding`); rows past len(labels) stay unnamed."""
    path = Path(path)
    labels = [str(x) for x in labels]
    with Image.open(path) as img:
        grid = img.convert("RGB")
    rows = max(1, len(labels))
    row_h = (grid.height - padding) // rows  # each row: padding + image height
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(grid)
    width = max((int(draw.textlength(t, font=font)) for t in labels), default=0) + 6
    out = Image.new("RGB", (grid.width + width, grid.height), (255, 255, 255))
    out.paste(grid, (width, 0))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(labels):
        top = padding + i * row_h
        draw.text((3, top + max(0, (row_h - padding - 11) // 2)), text, fill=(0, 0, 0), font=font)
    info = PngInfo()
    info.add_text("rows", json.dumps(labels))
    out.save(path, pnginfo=info)
    return path


def row_labels(path: str | Path) -> list[str] | None:
    """The row labels `label_rows` stored in a grid PNG, or None."""
    with Image.open(path) as img:
        text = img.info.get("rows")
    return json.loads(text) if text else None
