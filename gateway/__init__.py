"""matrix-gateway: a Trio-based federation gateway in front of a Matrix homeserver."""

__version__ = "0.1.0"
