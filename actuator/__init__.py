"""Actuator side: the interface the edge loop drives and its implementations."""
