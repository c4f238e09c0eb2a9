"""Terminal health: online / stale / offline / missing, alerts with flap suppression."""
