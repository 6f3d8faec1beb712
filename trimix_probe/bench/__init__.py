"""Benchmarks (not timed tests): ``triangle`` (the kernel and time to first token), ``dynamic``
(dynamic shallow layers), ``probe`` (the probe's cost); ``common`` holds their timing, environment
and named architectures."""
