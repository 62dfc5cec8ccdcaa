import pytest
import torch
from helpers import SMALL, benchmark_module, write_photos

import fcmae


@pytest.fixture
def small_model() -> fcmae.FCMAE:
    """A fresh SMALL model at 64 px, initialized as training starts it (seed 0), in training mode."""
    torch.manual_seed(0)
    return fcmae.create_model("atto", img_size=64, **SMALL)


@pytest.fixture
def photos(tmp_path):
    """12 real photos (96 px crops), some in nested folders: the data of the pretraining runs."""
    write_photos(tmp_path / "photos", 12, size=96)
    return tmp_path / "photos"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Folder indexes and downloaded shards go to a per-session cache, not ~/.cache/fcmae."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def probe():
    """benchmarks/probe.py as a module."""
    return benchmark_module("probe")
