"""What every checkpoint reader produces before lowering: arrays, config, tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RawCheckpoint:
    source: str
    state: dict[str, np.ndarray]
    config: dict[str, Any] | None = None
    tokenizer: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    config_source: str | None = None  # the file the config came from, when not `source` (safetensors' JSON)
