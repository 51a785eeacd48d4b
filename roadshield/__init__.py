"""roadshield: a road-sign classifier carried safely from the cloud to a robot."""

__version__ = "0.1.0"
