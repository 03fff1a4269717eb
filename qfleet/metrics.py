"""Metrics: one JSON object per event in metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from qfleet.config import ConfigError, QfleetWarning


class MetricsWriter:
    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        path = run_dir / "metrics.jsonl"
        self.fh = path.open("a", buffering=1)
        if self.fh.tell() and not _ends_with_newline(path):
            self.fh.write("\n")  # a crash cut the last line short: start a fresh one
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


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.seek(-1, 2)
        return fh.read(1) == b"\n"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``. Lines that are not a JSON object with an
    ``event`` and ``env_steps`` (cut short by a crash, edited by hand) are skipped with a
    warning naming them."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl (is it a qfleet run directory?)")
    records, bad = [], []
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:  # also UnicodeDecodeError
                record = None
            if isinstance(record, dict) and "event" in record and \
                    isinstance(record.get("env_steps"), (int, float)):
                records.append(record)
            else:
                bad.append(number)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        warnings.warn(f"{path}: skipped {len(bad)} unreadable line(s) (line {shown})",
                      QfleetWarning, stacklevel=2)
    return records
