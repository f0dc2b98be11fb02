"""The import paths of the public nnsight 0.8.1 extension API, re-exporting this package's own code.

    from nnsight.intervention.envoy import Envoy, eproperty
    from nnsight.intervention.hooks import requires_output
    from nnsight.intervention.interleaver import Mediator      # Mediator.OutOfOrderError
    from nnsight.intervention.tracing.globals import Object    # the type hint for traced values

Nothing here holds logic: each module names where the implementation lives.
"""
