"""Every op runs on its tensors' GPU, whichever device is current.

Triton launches on the current CUDA device and stream, so each launcher is wrapped in
`launches_on_tensor_device`; a launcher without it would run its kernel on the wrong GPU when a
trainer never calls set_device or a model is spread with device_map="auto". The structural test
and the decorator's own test run anywhere; the end-to-end test needs two GPUs."""

import ast
import contextlib
from pathlib import Path

import pytest
import torch

import em_kernels
from em_kernels import triton as triton_kernels

from conftest import runnable

TRITON_DIR = Path(em_kernels.__file__).parent / "triton"


def _launches_a_kernel(function: ast.FunctionDef) -> bool:
    """Whether the function's body holds a Triton launch: a call of a subscript,
    kernel[grid](...)."""
    return any(isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
               for node in ast.walk(function))


def _decorator_names(function: ast.FunctionDef) -> set[str]:
    return {decorator.id if isinstance(decorator, ast.Name) else ast.unparse(decorator)
            for decorator in function.decorator_list}


def test_every_triton_launcher_runs_on_its_tensors_device():
    launchers = {}
    for path in sorted(TRITON_DIR.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and _launches_a_kernel(node):
                launchers[f"{path.name}:{node.name}"] = _decorator_names(node)
    assert len(launchers) >= 6, launchers  # the entropy, linear_entropy and EM-INF launchers
    unguarded = [name for name, decorators in launchers.items()
                 if "launches_on_tensor_device" not in decorators]
    assert not unguarded, f"launchers without @launches_on_tensor_device: {unguarded}"


class _CudaTensorStandIn:
    device = torch.device("cuda", 1)


def test_launch_guard_makes_the_tensor_device_current(monkeypatch):
    """The decorator enters torch.cuda.device(tensor.device) around the launcher (recorded here
    in place of the real context manager, which needs a GPU), and leaves CPU tensors alone."""
    events = []

    @contextlib.contextmanager
    def recording_device(device):
        events.append(("enter", device))
        yield
        events.append(("exit", device))

    monkeypatch.setattr(torch.cuda, "device", recording_device)

    @triton_kernels.launches_on_tensor_device
    def launcher(tensor, value, *, scale):
        events.append(("launch", value * scale))
        return value * scale

    assert launcher(_CudaTensorStandIn(), 2, scale=3) == 6
    assert events == [("enter", torch.device("cuda", 1)), ("launch", 6),
                      ("exit", torch.device("cuda", 1))]
    events.clear()
    assert launcher(torch.zeros(1), 1, scale=5) == 5
    assert events == [("launch", 5)]


def _each_op(device, backend):
    """Every public op with gradients, on inputs made on ``device``: a dict of named results."""
    generator = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(5, 300, device=device, generator=generator).requires_grad_()
    tokens = torch.randint(0, 300, (5,), device=device, generator=generator)
    hidden = torch.randn(5, 32, device=device, generator=generator, dtype=torch.bfloat16)
    weight = torch.randn(300, 32, device=device, generator=generator, dtype=torch.bfloat16)
    hidden.requires_grad_()
    weight.requires_grad_()
    results = {}
    logprobs, entropy = em_kernels.logprobs_and_entropy(logits, tokens, backend=backend)
    (logits_grad,) = torch.autograd.grad((logprobs - entropy).sum(), logits)
    results.update(logprobs=logprobs, entropy=entropy, logits_grad=logits_grad)
    linear = em_kernels.linear_entropy(hidden, weight, tokens=tokens, backend=backend)
    results.update(zip(("linear_hidden_grad", "linear_weight_grad"), torch.autograd.grad(
        (linear.entropy + linear.logprobs).sum(), (hidden, weight))))
    loss = em_kernels.linear_entropy_loss(hidden, weight, tokens=tokens, entropy_weight=0.5,
                                          logprob_weight=-1.0, backend=backend)
    results.update(zip(("loss_hidden_grad", "loss_weight_grad"), torch.autograd.grad(
        loss.loss, (hidden, weight))))
    results["em_inf"] = em_kernels.em_inf_adjust(logits.detach(), backend=backend)
    results["adaptive"] = em_kernels.adaptive_temperature(logits.detach(), backend=backend)
    return results


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_ops_run_on_a_gpu_that_is_not_current(backend):
    if not runnable(backend, "cuda"):
        pytest.skip(f'backend="{backend}" cannot run here')
    with torch.cuda.device(1):
        expected = _each_op("cuda:1", backend)
    with torch.cuda.device(0):
        got = _each_op("cuda:1", backend)
        torch.cuda.synchronize(1)
    for name, value in expected.items():
        assert got[name].device == torch.device("cuda", 1), name
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)
