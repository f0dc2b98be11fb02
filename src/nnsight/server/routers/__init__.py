"""One router per resource: ``jobs``, ``models``, and ``service`` (health, metrics, status page)."""
