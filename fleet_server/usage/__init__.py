"""Usage statistics for office managers: rollups per office x service item x hour and day."""
