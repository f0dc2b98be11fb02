"""The engine: block capture (capture), interleaving with the model (interleaver), tracers (tracer)."""
