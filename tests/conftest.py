import pytest
import torch

import fcmae
from helpers import SMALL


@pytest.fixture
def small_model() -> fcmae.FCMAE:
    torch.manual_seed(0)
    return fcmae.create_model("atto", img_size=64, **SMALL)
