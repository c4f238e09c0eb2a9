"""Development tools above both deliverables: dev stack, demo, simulator, process and benchmark helpers.

Installed only for development and tests; neither the agent nor the server wheel carries it.
"""
