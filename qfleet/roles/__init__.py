"""Roles: plain classes with step-style methods that a backend places and drives."""

from qfleet.roles.actor import Actor, Chunk
from qfleet.roles.learner import DQNLearner, UpdateStats
from qfleet.roles.params import ParamSnapshot
from qfleet.roles.worker_loop import ActorLoop, Fetch, gradient_step

__all__ = ["Actor", "ActorLoop", "Chunk", "DQNLearner", "Fetch", "ParamSnapshot",
           "UpdateStats", "gradient_step"]
