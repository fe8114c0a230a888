"""The ``rlora`` command as a client of a running service: an HTTP client of the API
(`ApiClient`), where it connects and with which key (`profile`), and the commands."""
