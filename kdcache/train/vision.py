"""Image students for cross-modal distillation: a small convolutional classifier on pixels, and the images it reads.

The pixels come from image files named by a field the cache keeps (``generate --set keep_fields=[image]``),
paired row by row with what the teacher read (e.g. the same text rendered to an image). A path must be
relative and resolve inside ``image.root``; anything else is refused before training starts. The model is
saved as ``config.json`` + ``model.safetensors`` (no pickle) and loads back with :meth:`ConvClassifier.from_pretrained`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from kdcache.config import POSITIVE, check_fields, doc
from kdcache.locations import path_inside
from kdcache.errors import ConfigError, DataError


@dataclass
class ImageConfig:
    """What an image student reads and how it is built (classify.input: image)."""

    field: str = doc("Cache column (a kept dataset field) with each row's image path, relative to `root`.", "image")
    root: str = doc("Folder the image paths are relative to (every path must resolve inside it).", "")
    height: int = doc("Images are converted to grayscale and resized to height x width.", 64, valid=POSITIVE)
    width: int = doc("Width after resizing.", 320, valid=POSITIVE)
    channels: list[int] = doc("Output channels of each conv block (3x3 conv, GroupNorm, GELU, 2x2 max-pool).", default_factory=lambda: [32, 64, 128])
    columns: int = doc("The last block's features are averaged into this many vertical strips, left to right, before the "
                       "linear map: text is read in order, and a global average would lose where each word is.", 8, valid=POSITIVE)
    hidden: int = doc("Width of the image representation the head (and the teacher map) reads.", 128, valid=POSITIVE)

    def __post_init__(self):
        check_fields(self)
        if not self.channels or any(c < 1 for c in self.channels):
            raise ConfigError(f"image.channels must be positive channel counts, got {self.channels}")
        least = 2 ** len(self.channels)  # each block halves both sides
        if min(self.height, self.width) < least:
            raise ConfigError(f"image.height and image.width must be at least {least} for {len(self.channels)} conv blocks, "
                              f"got {self.height}x{self.width}")


class ConvClassifier(torch.nn.Module):
    """Conv blocks, averaging into ``columns`` strips (left to right) and a linear map to ``hidden``: :meth:`representation`;
    ``score`` the head."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = SimpleNamespace(**config)  # the checkpoint code reads model.config like a transformers model's
        blocks, c_in = [], 1
        for c in config["channels"]:
            blocks += [torch.nn.Conv2d(c_in, c, 3, padding=1), torch.nn.GroupNorm(math.gcd(8, c), c), torch.nn.GELU(), torch.nn.MaxPool2d(2)]
            c_in = c
        self.body = torch.nn.Sequential(*blocks, torch.nn.AdaptiveAvgPool2d((1, config["columns"])), torch.nn.Flatten())
        self.project = torch.nn.Linear(c_in * config["columns"], config["hidden_size"])
        self.score = torch.nn.Linear(config["hidden_size"], config["num_labels"])

    def representation(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(self.project(self.body(pixels)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.score(self.representation(pixels))

    def tie_weights(self) -> None:  # the checkpoint loader calls it on every model
        pass

    def save_pretrained(self, path: str | Path, safe_serialization: bool = True) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps({"kdcache_model": "ConvClassifier", **vars(self.config)}, indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ConvClassifier:
        from safetensors.torch import load_file

        config = json.loads((Path(path) / "config.json").read_text())
        if config.pop("kdcache_model", None) != "ConvClassifier":
            raise ConfigError(f"{path} does not hold a kdcache ConvClassifier")
        model = cls(config)
        model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
        return model


def build_image_classifier(cfg: ImageConfig, labels: list[str], seed: int) -> ConvClassifier:
    torch.manual_seed(seed)
    return ConvClassifier({"channels": list(cfg.channels), "columns": cfg.columns, "hidden_size": cfg.hidden, "num_labels": len(labels),
                           "image_size": [cfg.height, cfg.width], "id2label": dict(enumerate(labels)), "tie_word_embeddings": False})


def image_path(cfg: ImageConfig, value: Any) -> Path:
    """The file a row's path names, refused unless it is relative and inside ``cfg.root``."""
    return path_inside(cfg.root, value, "image.root", "image path")


def check_images(cfg: ImageConfig, values: list[Any]) -> None:
    """Every row's image exists inside the root: checked once, before training starts."""
    if not cfg.root:
        raise ConfigError("an image student needs image.root, the folder its image paths are relative to: --set image.root=DIR")
    if not Path(cfg.root).expanduser().is_dir():
        raise ConfigError(f"image.root {cfg.root} is not a folder")
    for value in values:
        if not image_path(cfg, value).is_file():
            raise DataError(f"image {value!r} is not a file under image.root {cfg.root}; fix the path or the root")


def load_pixels(cfg: ImageConfig, values: list[Any]) -> torch.Tensor:
    """[B, 1, height, width] float32 in [0, 1], dark text on light as 1 on 0 (inverted grayscale)."""
    from PIL import Image

    out = np.empty((len(values), 1, cfg.height, cfg.width), dtype=np.float32)
    for i, value in enumerate(values):
        with Image.open(image_path(cfg, value)) as im:
            g = im.convert("L").resize((cfg.width, cfg.height), Image.Resampling.BILINEAR)
        out[i, 0] = 1.0 - np.asarray(g, dtype=np.float32) / 255.0
    return torch.from_numpy(out)

