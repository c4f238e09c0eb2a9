"""Simulated terminals: the real agent code with simulated citizens and peripherals."""

from fleet_dev.sim.fleet import SimulatedFleet
from fleet_dev.sim.traffic import Catalogue, ServiceItem, SimClock, TrafficModel, load_catalogue

__all__ = ["Catalogue", "ServiceItem", "SimClock", "SimulatedFleet", "TrafficModel", "load_catalogue"]
