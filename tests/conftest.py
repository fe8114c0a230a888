import os

import pytest
import torch

# Without a GPU, Triton's kernels (rlora.kernels) run in its interpreter, read when Triton is
# first imported: the kernels' tests check them against the PyTorch path on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The service tests' fixtures (databases, apps, clients, tenants), shared as a plugin.
pytest_plugins = ["conftest_service"]

# Tests run on 2 cores next to a database and a broker: keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    from rlora.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def random_tiny_model_path(tmp_path_factory):
    """The tiny model's random initialisation, for tests of what pretraining does to it."""
    from rlora.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", pretrained=False)


@pytest.fixture
def tiny_model(tiny_model_path):
    """A fresh copy of the tiny base model in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules that run the tiny model token by token: its matmuls are too small for two
    threads to help, and on a shared 2-core machine spinning OpenMP threads make every step
    many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
