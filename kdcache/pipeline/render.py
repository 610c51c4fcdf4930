"""Paired data without downloads: each row's text rendered to an image, for cross-modal distillation.

`kdcache render-text` writes ``OUT/rows.jsonl`` (the dataset's fields plus ``image``, a path relative to OUT)
and ``OUT/img/<row>.png``: a language teacher reads the text, a vision student the pixels of the same text.
Pillow's built-in font at a fixed size, so the images are the same on every machine with the same Pillow.
Re-running with the same settings skips the images already written (each is written under a temporary name,
then renamed); other settings (dataset, field, size) in the same folder are refused, so a text is never
paired with another one's image.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kdcache.errors import ConfigError
from kdcache.pipeline.config import DataConfig
from kdcache.pipeline.data import iter_rows


def render_text(text: str, width: int = 320, height: int = 64, chars_per_line: int = 52) -> Any:
    """A grayscale PIL image of ``text``, whitespace collapsed and wrapped, as many 12-pixel lines as fit."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=10)
    im = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(im)
    for i, line in enumerate(textwrap.wrap(" ".join(text.split()), chars_per_line)[: max(1, height // 12)]):
        draw.text((2, 1 + 12 * i), line, fill=0, font=font)
    return im


def render_dataset(data: DataConfig, out: str | Path, width: int = 320, height: int = 64, progress: bool = True) -> Path:
    """Render ``data.field`` of every row; returns the rows file. Rows without text are skipped (their numbers stay
    unused, so a row's image is named by its index in the dataset)."""
    out = Path(out)
    marker = out / ".kdcache-render"
    if (out / "rows.jsonl").exists() and not marker.exists():
        raise ConfigError(f"{out} holds a rows.jsonl that kdcache did not write; choose another --out")
    settings = {"source": data.source, "split": data.split, "field": data.field, "width": width, "height": height}
    if marker.exists() and json.loads(marker.read_text()) != settings:
        raise ConfigError(f"{out} was rendered with other settings ({json.loads(marker.read_text())}); choose another --out")
    (out / "img").mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings))
    tmp = out / "rows.jsonl.tmp"
    with tmp.open("w") as f:
        for i, row in enumerate(tqdm(iter_rows(data), desc="render", unit="row", disable=not progress)):
            text = row.get(data.field)
            if not isinstance(text, str) or not text.strip():
                continue
            rel = f"img/{i:06d}.png"
            if not (out / rel).is_file():
                part = out / f"{rel}.tmp"
                render_text(text, width, height).save(part, format="PNG")
                os.replace(part, out / rel)
            if "image" in row:
                raise ConfigError(f"row {i} of {data.source} already has an `image` field; rename it before rendering")
            f.write(json.dumps({**row, "image": rel}) + "\n")
    os.replace(tmp, out / "rows.jsonl")
    return out / "rows.jsonl"
