"""The ``callsock`` command line."""
