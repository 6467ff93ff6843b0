"""Test-wide setup. Simulated CPU devices must be requested before jax is first imported.

One persistent XLA compilation cache for the whole session: the xdist workers and every subprocess a test
launches (CLI runs, kill/relaunch, multi-process) inherit it through the environment, so a program compiled once
is not compiled again by the next process that runs it (every program, however quick its compile: the
tests run many small ones). It is made fresh per session (nothing from an earlier run
or another checkout can be picked up) and removed when the session that made it ends.
"""

import atexit
import os
import shutil
import tempfile

# LLVM at -O0: the tests' programs are tiny, so compiling them costs more than running them (-O0 halves the
# compile of a sparse train step); optimisation level changes no IEEE result the tests compare (no fast-math).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the xdist controller, or a plain `pytest`; workers inherit it
    _cache = tempfile.mkdtemp(prefix="clipup-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the tests' programs are small: cache all
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from clipup_jax import workarounds  # noqa: E402  (after the environment above)

workarounds.apply()  # as every CLI and train() do on entry; the tests call library functions directly
