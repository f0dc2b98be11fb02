"""The engine behind ``with model.trace(...)``.

capture      find a with-block's source, compile it once per call site, skip Python's own run of it
tracer       the block contexts: Tracer (one model run), invokes, iteration over generation steps
interleaver  run invoke bodies in greenlets alongside the model; module hooks; errors for missed values
batching     each invoke's rows of a batched value, and putting edits back
backward     gradients inside ``with loss.backward():``
envoy        the mirror of the module tree (``model.transformer.h[0]``), asking the interleaver for values
aliases      ``rename=``: extra names for module paths, computed once from the module tree
eproperty    user-defined hookable values on envoy subclasses (the extension point)
values       ``.output`` / ``.input`` / ``.inputs``, shared by module and operation envoys
source       operation-level access (``module.source.<op>``)
cache        ``tracer.cache()``
lru          the bounded map the caches above use
scan, editing, session   ``model.scan()``, ``model.edit()``, ``model.session()``
errors       the exceptions, and tracebacks that start at the user's code
"""
