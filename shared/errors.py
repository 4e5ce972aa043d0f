"""The exception tree of netqueues. Foreign errors are converted at exactly one boundary each.

    NetqError
    ├── ConfigError            settings file, environment or flags are invalid
    ├── ProtocolError          a message failed validation (bad JSON, wrong types, too large, unknown kind)
    │   └── RequestError       an API request is well-formed MQTT but asks for something invalid
    ├── LinkError              the MQTT link failed (paho result codes, connection refused)
    ├── BrokerError            the embedded broker could not start or stop
    ├── StoreError             the SQLite replica failed (sqlite3 errors)
    ├── PrinterError           the printer or its host software refused or failed (OctoPrint HTTP errors)
    │   └── PrinterOffline     the printer cannot be reached
    ├── FileStoreError         a G-code file is missing, corrupt (hash mismatch) or could not be fetched
    ├── ArchiveError           a .gjob archive is malformed or hostile (zip-slip, zip bomb, oversized)
    └── NotArbiterError        a request reached a node that is not the arbiter
"""


class NetqError(Exception):
    """Root of every error that netqueues raises on purpose."""


class ConfigError(NetqError):
    pass


class ProtocolError(NetqError):
    pass


class RequestError(ProtocolError):
    pass


class LinkError(NetqError):
    pass


class BrokerError(NetqError):
    pass


class StoreError(NetqError):
    pass


class PrinterError(NetqError):
    pass


class PrinterOffline(PrinterError):
    pass


class FileStoreError(NetqError):
    pass


class ArchiveError(NetqError):
    pass


class NotArbiterError(NetqError):
    pass
