"""The vhost-user protocol without I/O: wire codecs (wire.py) and connection state (connection.py)."""
