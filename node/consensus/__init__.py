"""The replicated farm state: the quorum protocol and the SQLite replica it persists to."""
