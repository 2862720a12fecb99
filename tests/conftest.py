import os
from pathlib import Path

import pytest

# Tests never touch the network: UniverSeg's loader must not try to download.
os.environ["SPE_NO_DOWNLOAD"] = "1"
os.environ.pop("SPE_UNIVERSEG_WEIGHTS", None)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def _isolated_torch_hub(tmp_path_factory, monkeypatch):
    """Point torch.hub at an empty folder so a user's cached UniverSeg weights never leak into tests."""
    import torch

    hub = tmp_path_factory.mktemp("hub")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))


def pytest_configure(config):
    import torch

    # The tests are tiny; one thread avoids oversubscription slow-downs on small shared CPUs.
    torch.set_num_threads(1)
