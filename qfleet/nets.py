"""Networks: an MLP or Nature-CNN torso under a (optionally dueling) Q head."""

from __future__ import annotations

import torch
from torch import nn

from qfleet.config import ConfigError, NetConfig


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU(inplace=True)]
            in_dim = width
        self.body = nn.Sequential(*layers)
        self.out_dim = in_dim

    def forward(self, obs_BO: torch.Tensor) -> torch.Tensor:
        return self.body(obs_BO.float())


class NatureCNN(nn.Module):
    """Mnih et al. 2015 torso; takes uint8 (C, 84, 84) frames and scales them to [0, 1]."""

    def __init__(self, in_shape: tuple[int, ...], hidden: int = 512) -> None:
        super().__init__()
        channels = in_shape[0]
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, *in_shape)).shape[1]
        self.fc = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU())
        self.out_dim = hidden

    def forward(self, obs_BCHW: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(obs_BCHW.float() / 255.0))


class QNetwork(nn.Module):
    def __init__(self, torso: nn.Module, out_dim: int, num_actions: int, dueling: bool) -> None:
        super().__init__()
        self.torso = torso
        self.dueling = dueling
        self.advantage = nn.Linear(out_dim, num_actions)
        self.value = nn.Linear(out_dim, 1) if dueling else None

    def forward(self, obs_BO: torch.Tensor) -> torch.Tensor:
        h_BH = self.torso(obs_BO)
        adv_BA = self.advantage(h_BH)
        if self.value is None:
            return adv_BA
        # Subtracting the mean advantage makes V and A identifiable (Wang et al. 2016).
        return self.value(h_BH) + adv_BA - adv_BA.mean(dim=1, keepdim=True)


def pick_torso(cfg: NetConfig, obs_shape: tuple[int, ...]) -> str:
    torso = cfg.torso
    if torso == "auto":
        torso = "mlp" if len(obs_shape) == 1 else "cnn"
    if torso == "mlp" and len(obs_shape) != 1:
        raise ConfigError(f"net.torso = 'mlp': observation shape {obs_shape} is not flat; "
                          "use net.torso = 'cnn' or 'auto'")
    if torso == "cnn" and len(obs_shape) != 3:
        raise ConfigError(f"net.torso = 'cnn': observation shape {obs_shape} is not (C, H, W); "
                          "use net.torso = 'mlp' or 'auto'")
    if torso == "cnn" and obs_shape[-1] in (1, 3, 4) and obs_shape[0] > 4:
        raise ConfigError(f"net.torso = 'cnn': observation shape {obs_shape} looks channels-last "
                          "(H, W, C); the Nature-CNN takes (C, H, W): transpose it in a wrapper")
    if torso == "cnn" and min(obs_shape[1:]) < 36:
        raise ConfigError(f"net.torso = 'cnn': frames {obs_shape[1:]} are smaller than the "
                          "Nature-CNN's 36x36 minimum")
    return torso


def make_q_network(cfg: NetConfig, obs_shape: tuple[int, ...], num_actions: int) -> QNetwork:
    torso: MLP | NatureCNN
    if pick_torso(cfg, obs_shape) == "mlp":
        torso = MLP(obs_shape[0], cfg.hidden)
    else:
        torso = NatureCNN(obs_shape, cfg.hidden[-1] if cfg.hidden else 512)
    return QNetwork(torso, torso.out_dim, num_actions, cfg.dueling)
