"""The ground floor every tier may import: typed errors, atomic file writes, signatures.

It imports nothing of the project, so ``kernels``, ``actuator``, the edge runtime, the
cloud tier and the ``roadshield`` command all stand on it without standing on each other.
"""
