"""Deterministic simulator of the kvsvr protocol core: seeded network, crashes, clock."""

from jepsen_like.sim.run import SimConfig, SimResult, simulate
from jepsen_like.sim.world import NetworkFaults, World

__all__ = ["NetworkFaults", "SimConfig", "SimResult", "World", "simulate"]
