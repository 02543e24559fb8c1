import os

# Tests run on the CPU with one device unless a test starts its own subprocess with more.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Compiling dominates tiny runs, and many tests compile the same steps: share compiled programs across the
# tests, the xdist workers and the CLI subprocesses of a session (and later sessions) through JAX's cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ.get(
    "JAXREPLAY_TEST_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxreplay", "jax_cache_tests")))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
