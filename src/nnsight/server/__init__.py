"""Self-hostable server for ``remote=True``: ``nnsight serve MODEL --port 8000`` (see ``cli``)."""
