"""Home Assistant: MQTT discovery of one device per printer and one for the farm.

``summary`` turns node and farm state into the small retained JSON views that Home Assistant reads
(pure), ``discovery`` builds the discovery payloads (pure), ``publisher`` puts both on the broker.
"""
