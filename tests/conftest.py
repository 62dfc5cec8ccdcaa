import pytest
import torch

import fcmae
from helpers import SMALL


@pytest.fixture
def small_model() -> fcmae.FCMAE:
    torch.manual_seed(0)
    return fcmae.create_model("atto", img_size=64, **SMALL)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Folder indexes and downloaded shards go to a per-session cache, not ~/.cache/fcmae."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))
