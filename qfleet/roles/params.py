"""Parameters move as versioned snapshots: a reader pulls only when the version moved."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParamSnapshot:
    version: int  # learner updates that produced these parameters
    params: dict[str, torch.Tensor]  # CPU tensors, owned by the snapshot

    @staticmethod
    def of(module: nn.Module, version: int) -> ParamSnapshot:
        return ParamSnapshot(version, {k: v.detach().to("cpu", copy=True)
                                       for k, v in module.state_dict().items()})
