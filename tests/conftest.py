import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _leave_the_allocator_alone(monkeypatch):
    """mallopt is process-wide: a test that ran a timing command in process without ``--system-allocator``
    would change glibc's allocator for every test after it (tests/vit/test_bench.py counts page faults).
    Such a call fails the test that made it; tests that mean to set it do so in a subprocess."""
    from vision_eff import _timing

    def refuse():
        raise AssertionError("keep_freed_memory() called inside the pytest process: pass --system-allocator "
                             "to the command under test, or run it in a subprocess (mallopt is process-wide)")

    monkeypatch.setattr(_timing, "keep_freed_memory", refuse)
