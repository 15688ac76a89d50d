"""Seeded, pure sensor simulation shared by the agent, training, tests and benchmarks."""

from gateway.sim.generator import FAULTS, Generator, Machine

__all__ = ["FAULTS", "Generator", "Machine"]
