"""Each stage's own small option record, holding its one default per option. The stages take
their defaults from here; `RunConfig` (pipeline/config.py, a layer above) takes the defaults of
its stage fields from here too, so a default is still written once and no stage imports the
pipeline. Plain values only: importing this module imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DecodeParams:
    """Decode's limits (transforms/decode.py)."""

    max_pixels: int = 64_000_000
    min_side: int = 16
    max_aspect: float = 10.0
    max_side: Optional[int] = None
    jpeg_quality: int = 95
    decoded_cache_mb: int = 256


@dataclass(frozen=True)
class CaptionOptions:
    """The caption stage (transforms/caption.py)."""

    max_new_tokens: int = 30
    num_beams: int = 1
    batch_size: int = 8
    on_bad: str = "drop"  # a caption the guards flag: drop (dead letter) or keep (with caption_flags)


@dataclass(frozen=True)
class MaskOptions:
    """The mask stage (transforms/mask.py)."""

    threshold: float = 0.5
    fill: tuple[int, int, int] = (255, 255, 255)
    batch_size: int = 8


@dataclass(frozen=True)
class EmbedOptions:
    """The embed stage (transforms/embed.py)."""

    batch_size: int = 32
