"""Shared fixtures, written once per test session: a small synthetic federation and one
federation's CKKS key files. Both are read-only for tests."""

import random
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from fedhealth.core.crypto.keys import SiteKey, init_key_files, load_site_context
from fedhealth.core.synth import synthesize_federation

SYNTH_SITES, SYNTH_IMAGES, SYNTH_SIZE, SYNTH_SEED = 3, 40, 64, 11


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Scheduling for `make test` (`--dist loadgroup --no-loadscope-reorder`): a file's tests
    are one group, so its module fixtures run once on one worker, unless a test names its own
    group; groups that start real federations (`slow`) are handed out first, so that no long
    group starts while the other workers have nothing left to do."""
    groups: dict[pytest.Item, str] = {}
    for item in items:
        marker = item.get_closest_marker("xdist_group")
        if marker is None:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
        groups[item] = marker.args[0] if marker else item.path.stem
    slow = {groups[item] for item in items if item.get_closest_marker("slow")}
    # whole groups move, each in one piece, so a serial run sets module fixtures up once too
    items.sort(key=lambda item: groups[item] not in slow)  # stable


@pytest.fixture(scope="session")
def synth_federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-site federation (64 px, 40 images per site, scanner shift and label skew on).

    Read-only for tests: copy a site before changing it.
    """
    root = tmp_path_factory.mktemp("federation")
    synthesize_federation(root, SYNTH_SITES, SYNTH_SEED, images_per_site=SYNTH_IMAGES,
                          image_size=SYNTH_SIZE)
    return root


@pytest.fixture(scope="session")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`site.ctx` and `aggregator.ctx` of one federation (default preset)."""
    directory = tmp_path_factory.mktemp("keys")
    init_key_files(directory)
    return directory


@pytest.fixture(scope="session")
def site_key(key_dir: Path) -> SiteKey:
    return load_site_context(key_dir / "site.ctx")


def _ephemeral_ports() -> range:
    """The range the kernel hands out for port-0 binds and outgoing connections."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """Ports for servers a test starts itself (SuperLink, SuperNode runtime APIs).

    A port found free by binding port 0 comes from the ephemeral range, where any process's
    outgoing connection or port-0 bind can take it before our server binds it. These come from
    below that range (random, so concurrent sessions differ; never the same one twice here) and
    are bindable at the time they are handed out.
    """
    ephemeral = _ephemeral_ports()
    handed_out: set[int] = set()
    candidates = [p for p in range(20000, 32768) if p not in ephemeral]
    rng = random.Random()

    def pick() -> int:
        for port in rng.sample(candidates, len(candidates)):
            if port in handed_out:
                continue
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    continue
            handed_out.add(port)
            return port
        raise RuntimeError("no free port in 20000-32767")

    return pick
