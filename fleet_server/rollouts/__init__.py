"""Staged rollouts: a release reaches the targeted terminals in ordered, gated waves.

`RolloutService` (service.py) is what the API, the CLI and the console call; `RolloutEngine`
(engine.py) is the level-triggered control loop the scheduler ticks about once a second.
"""
