"""Metrics: one JSON object per event in metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsWriter:
    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.fh = (run_dir / "metrics.jsonl").open("a", buffering=1)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # late: slow import

            self.tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, event: str, record: dict[str, Any]) -> None:
        """``record`` must hold ``env_steps`` and ``wall_s`` (the public contract)."""
        self.fh.write(json.dumps({"event": event, **record}) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "env_steps":
                    self.tb.add_scalar(f"{event}/{key}", value, record["env_steps"])

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    with path.open() as fh:
        return [json.loads(line) for line in fh if line.strip()]
