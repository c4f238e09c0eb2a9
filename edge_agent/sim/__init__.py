"""Simulated terminals: the real agent code with simulated citizens and peripherals."""

from edge_agent.sim.fleet import SimulatedFleet
from edge_agent.sim.traffic import Catalogue, ServiceItem, SimClock, TrafficModel, load_catalogue

__all__ = ["Catalogue", "ServiceItem", "SimClock", "SimulatedFleet", "TrafficModel", "load_catalogue"]
