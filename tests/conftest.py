"""Shared test set-up: Triton's interpreter on machines without a GPU, hypothesis profiles, the
list of backends each op test runs on, a free port for the gloo tests, bitwise comparison and
CUDA-graph replay checks, and a fixture that keeps verl's modules out of the other tests."""

import datetime
import os
import socket
import sys

import torch

# The Triton kernels run on CPU tensors through the interpreter; it must be on before
# em_kernels (and triton.jit) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import em_kernels  # noqa: E402

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=25, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "dev", deadline=None, max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

HAS_CUDA = torch.cuda.is_available()


def triton_older_than(version: tuple[int, int]) -> bool:
    """Whether the installed Triton predates ``version`` (False without Triton)."""
    try:
        import triton
    except Exception:  # as em_kernels treats a broken install: no Triton
        return False
    return torch.torch_version.TorchVersion(triton.__version__) < version


def runnable(backend: str, device: str) -> bool:
    """Whether ``backend`` can run tensors on ``device`` here."""
    if device == "cuda" and not HAS_CUDA:
        return False
    status = em_kernels.available_backends()[backend]
    if status != "available":
        return False
    return {"cpu": device == "cpu", "cuda": device == "cuda"}.get(backend, True)


# (backend, device) pairs every op test runs; the ones that cannot run here skip with a reason.
BACKEND_DEVICES = [
    ("torch", "cpu"), ("triton", "cpu"), ("cpu", "cpu"),
    ("triton", "cuda"), ("cuda", "cuda"), ("torch", "cuda"),
]


def skip_unless_runnable(backend: str, device: str) -> tuple[str, str]:
    """Skip the calling test, with the reason, when ``backend`` cannot run on ``device`` here."""
    if not runnable(backend, device):
        reason = "no CUDA device" if device == "cuda" and not HAS_CUDA else (
            em_kernels.available_backends()[backend])
        pytest.skip(f"{backend} on {device}: {reason}")
    return backend, device


@pytest.fixture(params=BACKEND_DEVICES, ids=lambda bd: f"{bd[0]}-{bd[1]}")
def backend_device(request):
    return skip_unless_runnable(*request.param)


# A rank left waiting in a collective (its peer failed or hung) raises after this, instead of
# holding the run until CI's limit; far longer than a healthy wait here (a peer compiling a
# graph or running the interpreter: seconds).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=5)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a spawned process group to rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor: equal bits compare equal, NaN and -0.0 included."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return tensor.detach().contiguous().view(ints[tensor.element_size()])


def assert_cuda_graph_replays_eager(step, static: torch.Tensor, fresh_inputs) -> None:
    """step(static) captured in a CUDA graph, after one warm-up call on a side stream (Triton
    compiles, cuBLAS and the allocator set up outside the capture, as torch.cuda.graph
    requires); then, for each tensor of fresh_inputs copied into static, the replay's outputs
    must have the bits of an eager step(fresh). step returns a tensor or a tuple of them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(static)

    def as_tuple(outputs):
        return outputs if isinstance(outputs, tuple) else (outputs,)

    for fresh in fresh_inputs:
        static.copy_(fresh)
        graph.replay()
        for replayed, eager in zip(as_tuple(captured), as_tuple(step(fresh)), strict=True):
            assert torch.equal(bits(replayed), bits(eager))


@pytest.fixture
def without_verl_modules(monkeypatch):
    """The test runs without verl's modules in sys.modules (em-bench's loader and the README's
    verl swap load verl's kernel modules without its package inits): those it loads are removed
    after it, and those there before are put back."""
    def verl_modules():
        return [name for name in sys.modules if name.split(".")[0] == "verl"]

    for name in verl_modules():
        monkeypatch.delitem(sys.modules, name)  # put back by monkeypatch's own teardown, after ours
    yield
    for name in verl_modules():
        del sys.modules[name]
