"""What every benchmark's JSON records about where it ran, so numbers from different runs are never mixed up."""

from __future__ import annotations

import datetime
import platform

import torch
import triton


def run_info() -> dict[str, str]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no GPU)",
        "host": platform.node(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
