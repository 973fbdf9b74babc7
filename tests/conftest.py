import gc
import os
import shutil
import tempfile

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "ci",
    parent=settings.get_profile("default"),
    derandomize=False,
    print_blob=True,
)
settings.load_profile("ci" if os.environ.get("CI") else "default")


_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def pytest_configure(config):
    """One on-disk compilation cache for the whole run, shared by the xdist workers.

    Tests in different files, and the two workers, compile many of the same programs
    (every eager primitive on the same small shapes, the same tiny models); jax's
    persistent cache lets each be compiled once per run, also after the per-file
    ``jax.clear_caches()`` below.  The directory is made by the controlling process
    (workers inherit the environment) and removed at the end; a user-set
    ``JAX_COMPILATION_CACHE_DIR`` is used as it is and kept.  Entries are keyed by the
    program, the jax/XLA version and the compile options, so a hit is the same
    executable a fresh compile would give."""
    if hasattr(config, "workerinput") or _CACHE_ENV in os.environ:
        return
    path = tempfile.mkdtemp(prefix="pychop-jax-test-xla-cache-")
    config._pychop_jax_cache_dir = path
    os.environ[_CACHE_ENV] = path
    # Cache every program, however quick to compile or small.
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_unconfigure(config):
    path = getattr(config, "_pychop_jax_cache_dir", None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` first (a stable sort: each file's order is kept).

    Under ``pytest -n 2`` (the README's command) pytest-xdist hands out tests in this
    order; collected last (the example scripts under tests/ are), the slow tests ran
    one after another at the end of the run with the other worker idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_runtest_teardown(item, nextitem):
    """Free the compiled programs when a worker leaves a test file.

    jax keeps every executable it compiled for the life of the process; over the whole
    suite a worker grew past the machine's memory (the model-zoo file alone compiles
    ~3 GB of programs).  A file's own tests still share them: they are released only
    when the next test comes from another file."""
    if nextitem is None or nextitem.path != item.path:
        import jax

        jax.clear_caches()
        gc.collect()
