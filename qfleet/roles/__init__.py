"""Roles: plain classes with step-style methods that a backend places and drives."""

from qfleet.roles.actor import Actor, Chunk
from qfleet.roles.learner import DQNLearner, UpdateStats
from qfleet.roles.params import ParamSnapshot

__all__ = ["Actor", "Chunk", "DQNLearner", "ParamSnapshot", "UpdateStats"]
