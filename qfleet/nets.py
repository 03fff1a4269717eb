"""Networks: an MLP or Nature-CNN torso under a (optionally dueling) Q head, or under
policy and value heads (actor-critic)."""

from __future__ import annotations

import torch
from torch import nn

from qfleet.config import ConfigError, NetConfig


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: list[int], activation: str = "relu") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            act = nn.ReLU(inplace=True) if activation == "relu" else nn.Tanh()
            layers += [nn.Linear(in_dim, width), act]
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


class MinAtarCNN(nn.Module):
    """The MinAtar paper's torso (Young & Tian 2019): 16 3x3 filters, one dense layer. Its
    frames are 0/1 maps, so unlike the Nature CNN's pixels they need no scaling."""

    def __init__(self, in_shape: tuple[int, ...], hidden: int = 128) -> None:
        super().__init__()
        channels, height, width = in_shape
        self.conv = nn.Sequential(nn.Conv2d(channels, 16, 3, stride=1), nn.ReLU(), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(16 * (height - 2) * (width - 2), hidden), nn.ReLU())
        self.out_dim = hidden

    def forward(self, obs_BCHW: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(obs_BCHW.float()))


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


# The smallest frame side each conv torso takes (the Nature CNN's 8/4, 4/2, 3/1 convolutions
# need 36; MinAtar's one 3x3 needs 3). ``auto`` gives smaller frames than the CNN's to MinAtar.
MIN_SIDE = {"cnn": 36, "minatar": 3}


def pick_torso(cfg: NetConfig, obs_shape: tuple[int, ...]) -> str:
    torso = cfg.torso
    if torso == "auto":
        torso = ("mlp" if len(obs_shape) == 1
                 else "cnn" if min(obs_shape[1:]) >= MIN_SIDE["cnn"] else "minatar")
    if torso == "mlp" and len(obs_shape) != 1:
        raise ConfigError(f"net.torso = 'mlp': observation shape {obs_shape} is not flat; "
                          "use net.torso = 'cnn', 'minatar' or 'auto'")
    if torso in ("cnn", "minatar"):
        _check_frames(torso, obs_shape)
    return torso


def _check_frames(torso: str, obs_shape: tuple[int, ...]) -> None:
    if len(obs_shape) != 3:
        raise ConfigError(f"net.torso = {torso!r}: observation shape {obs_shape} is not "
                          "(C, H, W); use net.torso = 'mlp' or 'auto'")
    if obs_shape[-1] in (1, 3, 4) and obs_shape[0] > 4:
        raise ConfigError(f"net.torso = {torso!r}: observation shape {obs_shape} looks "
                          "channels-last (H, W, C); the conv torsos take (C, H, W): transpose "
                          "it in a wrapper")
    smallest = MIN_SIDE[torso]
    if min(obs_shape[1:]) < smallest:
        raise ConfigError(f"net.torso = {torso!r}: frames {obs_shape[1:]} are smaller than its "
                          f"{smallest}x{smallest} minimum" + (
                              "; use net.torso = 'minatar' (one 3x3 conv)"
                              if torso == "cnn" else ""))


class ActorCritic(nn.Module):
    """A policy head (logits) and a value head over one shared torso, or over two
    (``value_torso``). ``forward`` returns the logits, so acting, greedy evaluation and
    policy export treat it like a Q-network (argmax)."""

    def __init__(self, torso: nn.Module, out_dim: int, num_actions: int,
                 value_torso: nn.Module | None = None) -> None:
        super().__init__()
        self.torso, self.value_torso = torso, value_torso
        self.policy = nn.Linear(out_dim, num_actions)
        self.value = nn.Linear(out_dim, 1)

    def forward(self, obs_BO: torch.Tensor) -> torch.Tensor:
        return self.policy(self.torso(obs_BO))

    def logits_value(self, obs_BO: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h_BH = self.torso(obs_BO)
        v_BH = h_BH if self.value_torso is None else self.value_torso(obs_BO)
        return self.policy(h_BH), self.value(v_BH).squeeze(1)


def make_torso(cfg: NetConfig, obs_shape: tuple[int, ...]) -> MLP | NatureCNN | MinAtarCNN:
    torso = pick_torso(cfg, obs_shape)
    if torso == "mlp":
        return MLP(obs_shape[0], cfg.hidden, cfg.activation)
    if torso == "minatar":
        return MinAtarCNN(obs_shape, cfg.hidden[-1] if cfg.hidden else 128)
    return NatureCNN(obs_shape, cfg.hidden[-1] if cfg.hidden else 512)


def make_q_network(cfg: NetConfig, obs_shape: tuple[int, ...], num_actions: int) -> QNetwork:
    torso = make_torso(cfg, obs_shape)
    return QNetwork(torso, torso.out_dim, num_actions, cfg.dueling)


def make_actor_critic(cfg: NetConfig, obs_shape: tuple[int, ...],
                      num_actions: int) -> ActorCritic:
    torso = make_torso(cfg, obs_shape)
    value_torso = None if cfg.shared_torso else make_torso(cfg, obs_shape)
    net = ActorCritic(torso, torso.out_dim, num_actions, value_torso)
    if cfg.init == "orthogonal":
        orthogonal_init(net)
    return net


@torch.no_grad()
def orthogonal_init(net: ActorCritic) -> None:
    """Orthogonal weights, zero biases; a small policy head starts the policy near uniform."""
    for module in net.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.orthogonal_(module.weight, gain=2 ** 0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.orthogonal_(net.policy.weight, gain=0.01)
    nn.init.orthogonal_(net.value.weight, gain=1.0)
