"""The image encoder's precision modes and their autocast (used by the predictor and the backends)."""

from contextlib import nullcontext
from typing import ContextManager

import torch

PRECISIONS = ("fp32", "bf16", "fp16")


class EmulatedBF16Warning(RuntimeWarning):
    """bf16 asked for on a CPU without native bf16: it runs, emulated, several times slower than fp32.
    A class of its own so that a caller who has said so in its own words can silence exactly this."""


def autocast_context(device: torch.device, precision: str) -> ContextManager:
    """Autocast for the reduced-precision modes ("bf16", "fp16"); nothing for "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("fp16 is not supported on CPU; use precision='bf16'")
    return torch.autocast(device_type=device.type, dtype=dtype)
