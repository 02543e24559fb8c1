import os

# Tests run on the CPU with one device unless a test starts its own subprocess with more.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
