"""CUDA-specific checks: kernel registration (on any CUDA build), cuDNN on/off parity, graphs,
streams, devices, determinism, 64-bit indexing. GPU tests skip where no GPU is visible."""

import copy

import pytest
import torch

import bn_ext
from bn_ext._fake import OP_NAMES
from conftest import requires_cuda
from test_parity import LAYOUTS, run_parity

ops = torch.ops.bn_ext


@pytest.mark.skipif(not bn_ext.build_info()["cuda"], reason="bn_ext was built without CUDA")
@pytest.mark.parametrize("name", OP_NAMES)
def test_every_op_has_a_cuda_kernel(name):
    # its own per device, or one made of other bn_ext ops for every backend (csrc/composite.cpp)
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    composite = has(f"bn_ext::{name}", "CompositeExplicitAutograd")
    assert composite or has(f"bn_ext::{name}", "CUDA")
    assert composite or has(f"bn_ext::{name}", "CPU")


@requires_cuda
@pytest.mark.parametrize("cudnn", [True, False], ids=["cudnn", "native"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind,shape", [(1, (32, 7)), (2, (8, 6, 13, 9)), (3, (2, 5, 6, 7, 5))], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_parity_with_torch_cudnn_on_and_off(kind, shape, layout, dtype, cudnn):
    if layout == "channels_last" and len(shape) == 2:
        pytest.skip("(N, C) has one layout")
    with torch.backends.cudnn.flags(enabled=cudnn):
        run_parity(kind, shape, layout, dtype, "cuda", param_dtype=torch.float32)


@requires_cuda
@pytest.mark.parametrize(
    "shape,fmt",
    [
        ((4, 3, 224, 224), None),
        ((2, 32, 24, 24, 24), None),
        ((8, 64, 28, 28), torch.channels_last),
        ((64, 2048, 7, 7), None),
        ((4096, 1024), None),
        ((3, 5, 7, 11), torch.channels_last),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_matches_cpu_float64_reference(shape, fmt, dtype):
    """Large shapes that split channels across many blocks, against a float64 CPU computation."""
    x = (torch.randn(shape, device="cuda") * 2 + 3).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    c = shape[1]
    w = torch.rand(c, device="cuda") + 0.5
    b = torch.randn(c, device="cuda")
    if dtype == torch.float64:
        w, b = w.double(), b.double()
    y, mean, var = ops.batch_norm_train(x, w, b, 1e-5)
    x64 = x.double().cpu()
    dims = [0] + list(range(2, x.dim()))
    rvar, rmean = torch.var_mean(x64, dims, unbiased=False)
    view = [1, -1] + [1] * (x.dim() - 2)
    ry = (x64 - rmean.view(view)) / torch.sqrt(rvar.view(view) + 1e-5) * w.double().cpu().view(
        view
    ) + b.double().cpu().view(view)
    stat_tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(mean.double().cpu(), rmean, rtol=stat_tol, atol=stat_tol)
    torch.testing.assert_close(var.double().cpu(), rvar, rtol=stat_tol, atol=stat_tol)
    out_tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(y.double().cpu(), ry, rtol=out_tol, atol=out_tol)
    if fmt is not None:
        assert y.is_contiguous(memory_format=fmt)
    # and the same op on the CPU agrees (float64 path: exactly up to rounding of the reductions)
    if dtype == torch.float64:
        yc, mc, vc = ops.batch_norm_train(x.cpu(), w.cpu(), b.cpu(), 1e-5)
        torch.testing.assert_close(y.cpu(), yc, rtol=1e-12, atol=1e-12)


@requires_cuda
@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_bitwise_deterministic_run_to_run(fmt):
    x = torch.randn(16, 32, 40, 40, device="cuda") + 1
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    w = torch.rand(32, device="cuda")
    dy = torch.randn_like(x)
    first = None
    for _ in range(3):
        y, mean, var = ops.batch_norm_train(x, w, None, 1e-5)
        grads = ops.batch_norm_backward(dy, x, w, mean, var, 1e-5, True, [True, True, True])
        result = (y, mean, var, *grads)
        if first is None:
            first = result
        for a, b in zip(first, result):
            assert torch.equal(a, b)


@requires_cuda
def test_cuda_graph_capture_and_replay_of_a_training_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        bn_ext.BatchNorm2d(8, momentum=None),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 1),
        bn_ext.BatchNorm2d(4),
    ).cuda()
    eager = copy.deepcopy(model)
    static_x = torch.randn(4, 3, 16, 16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (allocations, autograd state) off the capture
        for _ in range(2):
            model(static_x).square().mean().backward()
    torch.cuda.current_stream().wait_stream(side)
    # start both copies from the same state
    model.load_state_dict(eager.state_dict())
    model.zero_grad(set_to_none=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = model(static_x)
        static_y.square().mean().backward()
    model.load_state_dict(eager.state_dict())  # capture does not run the kernels, but be sure
    for _ in range(3):
        x = torch.randn(4, 3, 16, 16, device="cuda")
        static_x.copy_(x)
        model.zero_grad(set_to_none=False)
        graph.replay()
        eager.zero_grad()
        y = eager(x)
        y.square().mean().backward()
        torch.testing.assert_close(static_y, y, rtol=1e-5, atol=1e-5)
    for (n, a), (_, b) in zip(model.state_dict().items(), eager.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    for (n, a), (_, b) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=n)


@requires_cuda
def test_kernels_run_on_the_current_stream():
    x = torch.randn(8, 16, 32, 32, device="cuda")
    m = bn_ext.BatchNorm2d(16).cuda()
    expected = copy.deepcopy(m)(x)
    side = torch.cuda.Stream()
    default = torch.cuda.current_stream()
    side.wait_stream(default)
    torch.cuda._sleep(200_000_000)  # keep the default stream busy for a while
    with torch.cuda.stream(side):
        y = m(x)
        y.sum().backward()
    side.synchronize()
    # had any of our kernels gone to the default stream, side would have waited behind the sleep
    assert not default.query(), "the default stream finished first: kernels did not run on `side`"
    torch.cuda.synchronize()
    torch.testing.assert_close(y, expected)


@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensor_on_a_non_current_device():
    x = torch.randn(4, 3, 8, 8, device="cuda:1")
    m = bn_ext.BatchNorm2d(3).to("cuda:1")
    ref = torch.nn.BatchNorm2d(3).to("cuda:1")
    with torch.cuda.device(0):
        y = m(x)
        yr = ref(x)
    assert y.device == torch.device("cuda:1")
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(m.running_var, ref.running_var)


@requires_cuda
def test_device_guard_on_current_device_index():
    """Ops take their device from the tensors, not from torch.cuda.current_device()."""
    x = torch.randn(4, 3, 8, 8, device="cuda:0")
    with torch.cuda.device(0):
        y0 = ops.batch_norm_train(x, None, None, 1e-5)[0]
    torch.testing.assert_close(y0, torch.nn.functional.batch_norm(x, None, None, training=True))


@requires_cuda
def test_mixed_device_arguments_are_rejected():
    x = torch.randn(4, 3, 5, device="cuda")
    with pytest.raises(RuntimeError, match="bias: expected a tensor on cuda"):
        ops.batch_norm_train(x, None, torch.zeros(3), 1e-5)
    with pytest.raises(RuntimeError, match="grad_out: expected a tensor on cuda"):
        mean, var = ops.batch_norm_stats(x)
        ops.batch_norm_backward(torch.randn(4, 3, 5), x, None, mean, var, 1e-5, True, [True, True, True])


@requires_cuda
@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
    reason="needs 40 GiB of GPU memory",
)
def test_more_than_2_to_the_31_elements():
    """64-bit indexing: 2^31 + 2^21 fp16 elements over 2 channels."""
    n = (2**31 + 2**21) // 2
    x = torch.empty(1, 2, n, device="cuda", dtype=torch.float16)
    x[:, 0].normal_(1.0, 2.0)
    x[:, 1].normal_(-3.0, 0.5)
    y, mean, var = ops.batch_norm_train(x, None, None, 1e-5)
    torch.testing.assert_close(mean.cpu(), torch.tensor([1.0, -3.0]), rtol=0, atol=1e-2)
    torch.testing.assert_close(var.cpu(), torch.tensor([4.0, 0.25]), rtol=1e-2, atol=0)
    # the last elements were written, with the right channel's statistics
    tail = x[0, 1, -1000:].float()
    expected = (tail - mean[1]) / torch.sqrt(var[1] + 1e-5)
    torch.testing.assert_close(y[0, 1, -1000:].float(), expected, rtol=1e-2, atol=1e-2)
    del x, y
    torch.cuda.empty_cache()
