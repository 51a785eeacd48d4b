"""Actuator side: the interface the edge loop drives and its implementations.

``actuator.interface`` (ActuatorCommand, Actuator, RecordingActuator) is the contract;
``actuator.serial_actuator.SerialActuator`` carries it over the authenticated serial
link (``actuator.link``) to a board running ``actuator/firmware`` or to the simulator
(``actuator.simulator``). Submodules are imported on use, so this package stays light.
"""
