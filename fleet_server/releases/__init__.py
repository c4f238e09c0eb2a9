"""TUF-signed releases: the offline keystore (used by `fleetctl release`), the server's TUF
repository under /tuf, publish verification, online re-signing of snapshot and timestamp, and the
in-process ReleaseService the rollout engine asks about releases."""
