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
