"""Read back what an offline Weights & Biases run logged, from its run-<id>.wandb file.

wandb 0.31 has no Python reader for offline runs (its reader lives in the Go core), so this
decodes the file the documented way: a LevelDB-style log (a 7-byte ":W&B" header, then 32 KiB
blocks of records, each with a 7-byte header: CRC32, length, type full/first/middle/last)
whose records are wandb's own ``Record`` protobuf messages, parsed with wandb's classes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = struct.Struct("<IHB")  # crc32, length, record type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    run_id: str
    project: str
    tags: list[str]
    config: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None


def _records(data: bytes) -> list[bytes]:
    assert data[:4] == b":W&B", data[:7]
    records, pending, pos = [], b"", 7
    while pos + HEADER.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER.size:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = HEADER.unpack_from(data, pos)
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + HEADER.size: pos + HEADER.size + length]
        pos += HEADER.size + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
    return records


def _items(items: Any) -> dict[str, Any]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in items}


def read_offline_run(wandb_file: Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2 as pb

    run: OfflineRun | None = None
    history, config, exit_code, kinds = [], {}, None, []
    data = wandb_file.read_bytes()
    for raw in _records(data):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        kinds.append(kind)
        if kind == "run":
            run = OfflineRun(record.run.run_id, record.run.project, list(record.run.tags), {})
            config |= _items(record.run.config.update)
        elif kind == "config":
            config |= _items(record.config.update)
        elif kind == "history":
            history.append(_items(record.history.item))
        elif kind == "exit":
            exit_code = record.exit.exit_code
    assert run is not None, f"{wandb_file} ({len(data)} bytes): no run record in {kinds}"
    run.config = {k: v for k, v in config.items() if not k.startswith("_")}
    run.history, run.exit_code = history, exit_code
    return run
