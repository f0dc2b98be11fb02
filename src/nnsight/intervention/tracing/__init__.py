"""``nnsight.intervention.tracing``: where nnsight 0.8.1-era code imports tracing names from."""
