"""Tests of device.py on CPU: the graph path's optimizer steps like the eager one, and a recording stand-in for a
CUDA graph replays training bit for bit (test_metamae checks what capture itself forbids)."""

import contextlib
import copy
import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import device
import train
from conftest import tiny_model, train_losses


def test_graph_mode_optimizer_steps_like_the_eager_one():
    # --cuda-graph keeps the lr and the step count on the device (a tensor lr, capturable AdamW) so a replayed
    # step reads them there: the updates must be those of the eager optimizer, also after resuming its state
    x, lrs = torch.rand(8, 3, 16, 16), [1e-3, 5e-4, 2e-4, 1e-4]
    cfg = train.Config(device="cpu")
    eager = tiny_model()
    eager_opt = train.make_optimizer(eager, cfg)
    graph = tiny_model()
    graph_opt = train.make_optimizer(graph, cfg)
    lr_tensor = device.device_lr(graph_opt, torch.device("cpu"))  # a captured step holds this very tensor
    assert all(g["lr"] is lr_tensor and g["capturable"] for g in graph_opt.param_groups)
    # not bit for bit: the tensor lr is float32, the Python one float64
    assert train_losses(eager, eager_opt, cfg, lrs[:2], x) == pytest.approx(
        train_losses(graph, graph_opt, cfg, lrs[:2], x, lr_tensor), rel=1e-6)
    assert all(g["lr"] is lr_tensor for g in graph_opt.param_groups) and lr_tensor.item() == pytest.approx(lrs[1])
    for p, q in zip(eager.parameters(), graph.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # an update is ~1e-4
    # resume the eager run's state in graph mode: GraphedStep is built after loading, so the saved float lr
    # is replaced by the device tensor
    resumed = tiny_model()
    resumed.load_state_dict(eager.state_dict())
    resumed_opt = train.make_optimizer(resumed, cfg)
    resumed_opt.load_state_dict(copy.deepcopy(eager_opt.state_dict()))  # as if from disk
    resumed_lr = device.device_lr(resumed_opt, torch.device("cpu"))
    assert all(g["lr"] is resumed_lr and g["capturable"] for g in resumed_opt.param_groups)
    train_losses(eager, eager_opt, cfg, lrs[2:], x)
    train_losses(resumed, resumed_opt, cfg, lrs[2:], x, resumed_lr)
    for p, q in zip(eager.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # an update is ~1e-4

class FakeGraph:
    """A CPU stand-in for torch.cuda.CUDAGraph. Capture records every aten op the step dispatches, with the
    very tensors it read and wrote; replay re-runs them into the same tensors. As in a real graph, what
    Python decided at capture (a float lr, a branch, a value read from a tensor) stays frozen, and random
    ops draw anew. Unlike a real graph, capture also executes the step once."""

    def __init__(self):
        self.ops = []

    @torch.no_grad()  # kernels only, as a GPU replays them: no autograd bookkeeping
    def replay(self):
        for func, args, kwargs, out in self.ops:
            new = func(*args, **kwargs)
            for old, fresh in zip(tree_leaves(out), tree_leaves(new)):
                if isinstance(old, torch.Tensor) and old.data_ptr() != fresh.data_ptr():
                    old.copy_(fresh)

class Record(TorchDispatchMode):
    def __init__(self, graph):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:  # a view aliases memory the replay refreshes anyway
            self.graph.ops.append((func, args, kwargs or {}, out))
        return out

class FakeStream:
    def wait_stream(self, other):
        pass

def test_cuda_graph_step_replays_like_eager_training(monkeypatch):
    # GraphedStep on CPU through FakeGraph: its warm-up, capture on static buffers, lr handling and returned
    # tensors must give the eager run's losses and weights bit for bit (the meta-device test in
    # test_metamae covers what capture itself forbids: host syncs and host-to-device copies)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: Record(g))
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    cfg = train.Config(device="cpu", cuda_graph=True)
    autocast = device.setup(train.Config(device="cpu")).autocast
    batches = torch.rand(8, 4, 3, 16, 16)
    lrs = [1e-3, 8e-4, 6e-4, 4e-4, 3e-4, 2e-4, 1e-4, 5e-5]
    graphed = tiny_model()
    step = device.prepare(graphed, train.make_optimizer(graphed, cfg), cfg, device.setup(cfg), train.train_step)
    assert isinstance(step, device.GraphedStep)
    torch.manual_seed(0)
    got = [step(x, lr)[0].item() for x, lr in zip(batches, lrs)]
    assert len(step.graph.ops) > 100
    eager = tiny_model()
    opt = train.make_optimizer(eager, cfg)
    lr_tensor = device.device_lr(opt, torch.device("cpu"))
    no_cache = functools.partial(autocast, cache_enabled=False)
    torch.manual_seed(0)
    want = []
    for i, (x, lr) in enumerate(zip(batches, lrs)):
        lr_tensor.fill_(lr)
        if i == 3:  # the fake's capture ran this step once already
            train.train_step(eager, opt, x, cfg, no_cache)
        want.append(train.train_step(eager, opt, x, cfg, no_cache)[0].item())
    assert got == want
    for p, q in zip(graphed.parameters(), eager.parameters()):
        assert torch.equal(p, q)
