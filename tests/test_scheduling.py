"""`make test`'s scheduling holds: each file is one xdist group (tests/conftest.py)."""

import pytest


def test_under_loadgroup_a_file_is_one_group_in_the_node_id(request: pytest.FixtureRequest) -> None:
    """xdist schedules by the `@group` suffix of a node id. Without it every test is scheduled on
    its own, and a file's module fixtures (whole federations) run once on each worker."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("runs under `make test` (pytest-xdist, --dist loadgroup)")
    assert request.node.nodeid.endswith(f"@{request.path.stem}"), request.node.nodeid
