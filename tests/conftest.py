import gc
import os

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
