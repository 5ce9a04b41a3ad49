"""Shared test setup: tiny tensors, one thread, and the reference fixtures kept in tests/fixtures."""
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# The reference fixtures (tensors the published implementations produced) are part of the repository;
# CAUSALMER_FIXTURES may point at another copy.
FIXTURES = Path(os.environ.get("CAUSALMER_FIXTURES") or REPO / "tests" / "fixtures")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"reference fixtures not found at {FIXTURES} (tests/fixtures in the repository, or the "
                    "folder named by CAUSALMER_FIXTURES)")
    return FIXTURES


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """Factory for tiny synthetic MulT pickles, shared by the session.

    `synthetic_data(dataset="iemocap", aligned=True, scale=0.0005, **options)` writes the file once
    (4-8 samples per split at the default scale) and returns its data directory. Treat the result as
    read-only: a test that modifies files should call `write_synthetic` into its own tmp_path.
    """
    root = tmp_path_factory.mktemp("synthetic")
    written = {}

    def make(dataset="iemocap", aligned=True, scale=0.0005, **options):
        from src.data.synthetic import write_synthetic

        key = (dataset, aligned, scale, tuple(sorted(options.items())))
        if key not in written:
            data_dir = root / f"set{len(written)}"
            write_synthetic(data_dir, dataset, aligned=aligned, scale=scale, **options)
            written[key] = data_dir
        return written[key]

    return make


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a CUDA device; without one they are reported as skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none is available)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
