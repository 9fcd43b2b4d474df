"""Modules: parameter discovery and naming, state dicts, modes, dtype moves, and a model that learns."""

from __future__ import annotations

import math

import numpy as np
import pytest

import minigrad as mg
from minigrad import F, Tensor, nn, optim


class Block(nn.Module):
    def __init__(self, dim):
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 2 * dim)
        self.drop = nn.Dropout(0.5)
        self.proj = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x):
        return x + self.proj(self.drop(F.gelu(self.fc(self.ln(x)))))


class Net(nn.Module):
    def __init__(self, vocab=7, dim=4, n_blocks=2, tie=False):
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim) for _ in range(n_blocks)])
        self.ln_f = nn.LayerNorm(dim, bias=False)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


BLOCK_NAMES = ["ln.weight", "ln.bias", "fc.weight", "fc.bias", "proj.weight"]


def test_named_parameters_order_and_names(backend):
    net = Net()
    names = [n for n, _ in net.named_parameters()]
    expected = (["emb.weight"] + [f"blocks.{i}.{n}" for i in range(2) for n in BLOCK_NAMES]
                + ["ln_f.weight", "head.weight"])
    assert names == expected
    shapes = {n: p.shape for n, p in net.named_parameters()}
    assert shapes["emb.weight"] == (7, 4)
    assert shapes["blocks.1.fc.weight"] == (8, 4)
    assert shapes["blocks.0.fc.bias"] == (8,)
    assert shapes["blocks.0.proj.weight"] == (4, 8)
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in net.parameters())
    assert net.num_parameters() == sum(int(np.prod(s)) for s in shapes.values())
    assert [n for n, _ in net.blocks[1].named_parameters(prefix="b.")] == ["b." + n for n in BLOCK_NAMES]
    assert len(net.blocks) == 2 and list(net.blocks) == [net.blocks[0], net.blocks[1]]


def test_shared_parameter_is_listed_once(backend):
    net = Net(tie=True)
    names = [n for n, _ in net.named_parameters()]
    assert "head.weight" not in names and names.count("emb.weight") == 1
    assert net.num_parameters() == Net().num_parameters() - 7 * 4
    # a module used twice is also counted once
    shared = nn.Linear(3, 3)
    seq = nn.Sequential(shared, nn.Tanh(), shared)
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias"]
    # and the shared weight gets the gradient of both uses
    x = Tensor(np.ones((2, 3)))
    seq(x).sum().backward()
    assert shared.weight.grad is not None and shared.weight.grad.shape == (3, 3)


def test_state_dict_round_trip(backend):
    mg.manual_seed(1)
    a = Net()
    mg.manual_seed(2)
    b = Net()
    ids = mg.backend.asarray(np.array([[1, 2, 3, 6]]))
    a.eval()
    b.eval()
    assert not np.allclose(a(ids).numpy(), b(ids).numpy())
    state = a.state_dict()
    assert list(state) == [n for n, _ in a.named_parameters()]
    b.load_state_dict({k: mg.to_numpy(v) for k, v in state.items()})  # host arrays load fine
    np.testing.assert_array_equal(a(ids).numpy(), b(ids).numpy())
    # load copies: changing the source afterwards does not change the model
    state["emb.weight"][...] = 0.0
    assert np.abs(b.emb.weight.numpy()).sum() > 0
    assert b.emb.weight.dtype == np.float32


def test_load_state_dict_errors_change_nothing(backend):
    net = Net()
    good = {k: mg.to_numpy(v).copy() for k, v in net.state_dict().items()}
    before = net.emb.weight.numpy().copy()

    bad_shape = dict(good)
    bad_shape["blocks.0.fc.weight"] = np.zeros((8, 5), np.float32)
    bad_shape["emb.weight"] = good["emb.weight"] + 1  # comes first, but must not be copied either
    with pytest.raises(ValueError, match=r"blocks\.0\.fc\.weight.*\(8, 4\).*\(8, 5\)"):
        net.load_state_dict(bad_shape)
    np.testing.assert_array_equal(net.emb.weight.numpy(), before)  # checked before anything is copied

    missing = {k: v for k, v in good.items() if k != "head.weight"}
    with pytest.raises(KeyError, match=r"missing head\.weight"):
        net.load_state_dict(missing)

    unexpected = dict(good, extra=np.zeros(3))
    with pytest.raises(KeyError, match="unexpected extra"):
        net.load_state_dict(unexpected)

    net.load_state_dict(dict(missing, extra=np.zeros(3)), strict=False)  # non-strict skips both


def test_train_eval_propagate(backend):
    net = Net()
    assert all(m.training for m in net.modules())
    assert net.eval() is net
    mods = list(net.modules())
    assert len(mods) == 1 + 1 + 1 + 2 * 5 + 1 + 1  # net, emb, blocks list, 2 x (block + 4), ln_f, head
    assert not any(m.training for m in mods)
    ids = mg.backend.asarray(np.array([[0, 1, 2, 3, 4, 5]]))
    np.testing.assert_array_equal(net(ids).numpy(), net(ids).numpy())  # dropout off: deterministic
    net.train()
    assert all(m.training for m in net.modules())
    assert not np.allclose(net(ids).numpy(), net(ids).numpy())  # dropout on

    drop = nn.Dropout(0.5)
    x = Tensor(np.ones((10, 10)))
    assert drop.eval()(x) is x
    with pytest.raises(ValueError):
        nn.Dropout(1.5)


def test_zero_grad(backend):
    net = Net()
    ids = mg.backend.asarray(np.array([[1, 2, 3]]))
    F.cross_entropy(net(ids), mg.backend.asarray(np.array([[2, 3, 4]]))).backward()
    assert all(p.grad is not None for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_module_to_float64_and_whole_model_gradcheck(backend):
    mg.manual_seed(5)
    net = Net(vocab=5, dim=4, n_blocks=1)
    net.eval()
    ids = mg.backend.asarray(np.array([[0, 3, 3]]))
    out32 = net(ids).numpy()
    assert net.to(np.float64) is net
    assert all(p.dtype == np.float64 and p.grad is None for p in net.parameters())
    out64 = net(ids)
    assert out64.dtype == np.float64
    np.testing.assert_allclose(out64.numpy(), out32, rtol=1e-4, atol=1e-5)
    targets = mg.backend.asarray(np.array([[3, 3, 1]]))
    params = net.parameters()

    def loss(*_):
        return F.cross_entropy(net(ids), targets)

    assert mg.gradcheck(loss, *params)


def test_layers_match_functional(backend):
    lin = nn.Linear(3, 2)
    x = Tensor(np.arange(6.0).reshape(2, 3))
    np.testing.assert_allclose(lin(x).numpy(), x.numpy() @ lin.weight.numpy().T + lin.bias.numpy(), rtol=1e-6)
    bound = 1 / math.sqrt(3)
    assert np.abs(lin.weight.numpy()).max() <= bound and lin.weight.dtype == np.float32
    assert nn.Linear(3, 2, bias=False).bias is None
    emb = nn.Embedding(10, 3)
    np.testing.assert_array_equal(emb([4, 4]).numpy(), emb.weight.numpy()[[4, 4]])
    ln = nn.LayerNorm(3)
    np.testing.assert_array_equal(ln.weight.numpy(), 1.0)
    np.testing.assert_array_equal(ln.bias.numpy(), 0.0)
    xn = x.numpy()
    np.testing.assert_allclose(nn.GELU()(x).numpy(), F.gelu(x).numpy())
    np.testing.assert_allclose(nn.ReLU()(x - 2.0).numpy(), np.maximum(xn - 2.0, 0))
    np.testing.assert_allclose(nn.Tanh()(x).numpy(), np.tanh(xn), rtol=1e-6)
    with pytest.raises(TypeError, match="forward"):
        nn.Module()(x)


def test_init_is_seeded(backend):
    mg.manual_seed(9)
    a = Net()
    mg.manual_seed(9)
    b = Net()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(p.numpy(), q.numpy(), err_msg=n)


# ---------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------

def train(model, x, y, steps, lr):
    opt = optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_mlp_learns_xor(backend):
    x = Tensor(np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32))
    y = mg.backend.asarray(np.array([0, 1, 1, 0]))
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
    losses = train(model, x, y, steps=200, lr=0.05)
    assert losses[0] > 0.5  # chance level is ln 2 = 0.69
    assert losses[-1] < 0.05
    pred = mg.to_numpy(model(x).data).argmax(axis=1)
    np.testing.assert_array_equal(pred, [0, 1, 1, 0])


def spiral(n_per_class=100, seed=0):
    """Two interleaved spirals in 2-D (class 0 and class 1), a classic not-linearly-separable task."""
    rng = np.random.default_rng(seed)
    r = np.linspace(0.1, 1.0, n_per_class)
    xs, ys = [], []
    for c in range(2):
        theta = np.linspace(0, 3 * np.pi, n_per_class) + c * np.pi + rng.normal(0, 0.1, n_per_class)
        xs.append(np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1))
        ys.append(np.full(n_per_class, c))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def test_mlp_learns_a_spiral(backend):
    xn, yn = spiral()
    x, y = Tensor(xn), mg.backend.asarray(yn)
    model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    losses = train(model, x, y, steps=400, lr=0.02)
    accuracy = (mg.to_numpy(model(x).data).argmax(axis=1) == yn).mean()
    assert losses[-1] < 0.2 * losses[0]
    assert accuracy > 0.95
