import os

import pytest
import torch

# Tests never reach the Hugging Face Hub: the digits task and diffusers configs are all local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU the Triton kernels run in the interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

BACKENDS = ("torch", "cpp", "triton")


def pytest_configure(config):
    """The whole suite runs with the CPU allocator setting the trainer uses (sqdf_fast.memory), so that every test's
    training runs, in this one process, reuse freed blocks instead of page-faulting them in again."""
    from sqdf_fast.memory import keep_freed_cpu_memory
    keep_freed_cpu_memory()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test on each op backend (skipped where one cannot run here), on the tensors' CPU device."""
    from sqdf_fast import ops
    with ops.use_backend(request.param):
        try:
            ops.backend_for("cpu")
        except ValueError as err:
            pytest.skip(str(err))
        yield request.param


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def one_thread():
    """For 2-D tasks (`pytestmark = pytest.mark.usefixtures("one_thread")`): their batches are far too small for
    intra-op threads, which only spin and stall when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
