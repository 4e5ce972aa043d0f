"""Pure protocol code shared by the broker host and the node agent: models, topics, codec, settings, errors.

Nothing in this package performs I/O or reads the clock; time is passed in as ``now``.
"""

PROTOCOL_VERSION = 1
