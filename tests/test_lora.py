"""Fine-tuning's engine parts: freezing parameters, parameter groups, and LoRA (gradchecked)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import minigrad as mg
from minigrad import F, Tensor, gradcheck, nn, optim
from minigrad.lora import LoRALinear, apply_lora, low_rank_update, merge_lora

RNG = np.random.default_rng(2024)


def t(*shape, scale=1.0, requires_grad=True):
    return Tensor(RNG.standard_normal(shape) * scale, requires_grad=requires_grad, dtype=np.float64)


class Block(nn.Module):
    def __init__(self, dim):
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.proj(F.gelu(self.fc(self.ln(x))))


class Net(nn.Module):
    def __init__(self, vocab=7, dim=4, n_blocks=2, classes=None):
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim) for _ in range(n_blocks)])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes or vocab)

    def forward(self, ids):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


IDS = np.array([[1, 2, 3], [4, 5, 6]])


def loss_of(net, ids=IDS):
    logits = net(ids)
    return F.cross_entropy(logits, (np.asarray(ids) + 1) % logits.shape[-1])


# ---------------------------------------------------------------------------------------------
# Freezing
# ---------------------------------------------------------------------------------------------

def test_frozen_leaf_gets_no_gradient_and_all_frozen_ops_build_no_graph(backend):
    w = t(3, 4).requires_grad_(False)
    x = t(2, 4)
    y = F.linear(x, w)
    y.sum().backward()
    assert w.grad is None and x.grad is not None
    np.testing.assert_allclose(x.grad if backend == "numpy" else mg.to_numpy(x.grad),
                               np.ones((2, 3)) @ w.numpy())
    frozen_x = Tensor(x.numpy())  # a constant
    out = F.gelu(F.linear(frozen_x, w))
    assert not out.requires_grad and out._parents == () and out._backward is None


def test_requires_grad_on_a_computed_tensor_raises(backend):
    y = t(2) * 2.0
    with pytest.raises(RuntimeError, match="freeze the leaves"):
        y.requires_grad_(False)


def test_module_freezing_and_trainable_parameters(backend):
    net = Net()
    total = net.num_parameters()
    assert net.trainable_parameters() == net.parameters()
    net.requires_grad_(False)
    assert net.trainable_parameters() == [] and net.num_parameters(trainable_only=True) == 0
    net.blocks[-1].requires_grad_(True)     # the book's chapter 6 recipe
    nn.unfreeze(net.ln_f)
    names = [n for n, _ in net.named_trainable_parameters()]
    assert names == [f"blocks.1.{n}" for n in ("ln.weight", "ln.bias", "fc.weight", "fc.bias",
                                                "proj.weight", "proj.bias")] + ["ln_f.weight", "ln_f.bias"]
    assert net.num_parameters() == total
    nn.freeze(net.ln_f)
    assert not any(n.startswith("ln_f") for n, _ in net.named_trainable_parameters())


def test_backward_stores_gradients_only_for_trainable_parameters(backend):
    mg.set_default_dtype(np.float64)
    net = Net()
    net.requires_grad_(False)
    net.blocks[-1].requires_grad_(True)
    net.head.requires_grad_(True)
    # Nothing before the first trainable layer needs a gradient, so it builds no graph at all
    h = net.blocks[0](net.emb(IDS))
    assert not h.requires_grad and h._parents == ()
    loss_of(net).backward()
    for name, p in net.named_parameters():
        trainable = name.startswith(("blocks.1.", "head."))
        assert (p.grad is not None) == trainable, name
    # ... and those gradients are the ones the unfrozen model computes for the same parameters
    full = Net()
    full.load_state_dict(net.state_dict())
    loss_of(full).backward()
    for (name, p), (_, q) in zip(net.named_parameters(), full.named_parameters()):
        if p.grad is not None:
            np.testing.assert_allclose(mg.to_numpy(p.grad), mg.to_numpy(q.grad), rtol=1e-12, atol=1e-14,
                                       err_msg=name)


def test_gradcheck_through_a_partly_frozen_network(backend):
    mg.set_default_dtype(np.float64)
    net = Net(n_blocks=1)
    net.requires_grad_(False)
    net.ln_f.requires_grad_(True)
    w, b = net.ln_f.weight, net.ln_f.bias
    assert gradcheck(lambda w, b: loss_of(net), w, b)


# ---------------------------------------------------------------------------------------------
# Optimizers: frozen parameters left out, parameter groups with their own learning rates
# ---------------------------------------------------------------------------------------------

def test_optimizers_leave_frozen_parameters_out(backend):
    net = Net()
    net.requires_grad_(False)
    net.head.requires_grad_(True)
    before = {n: mg.to_numpy(p.data).copy() for n, p in net.named_parameters()}
    for opt in (optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.1), optim.SGD(net.parameters(), lr=0.1)):
        assert opt._all_params() == net.trainable_parameters()
        net.zero_grad()
        loss_of(net).backward()
        opt.step()
        assert len(opt.state_dict()["groups"]) == 1 and opt.state_dict()["groups"][0]["num_params"] == 2
    for n, p in net.named_parameters():
        changed = not np.array_equal(mg.to_numpy(p.data), before[n])
        assert changed == n.startswith("head."), n
    with pytest.raises(ValueError, match="no trainable parameters"):
        optim.AdamW(net.ln_f.parameters())


def test_parameter_groups_with_their_own_learning_rates(backend):
    """Two groups in one AdamW = two AdamWs, each with its group's settings; frozen members of a
    group are dropped from it."""
    def fresh():
        mg.manual_seed(3)
        net = Net()
        net.blocks[0].requires_grad_(False)
        return net

    def groups(net):
        return [{"params": net.head.parameters(), "lr": 1e-2},
                {"params": net.blocks[1].parameters() + net.blocks[0].parameters(), "weight_decay": 0.0}]

    a = fresh()
    opt = optim.AdamW(groups(a), lr=1e-3, weight_decay=0.1)
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-3]
    assert [len(g["params"]) for g in opt.param_groups] == [2, 6]
    b = fresh()
    g0, g1 = groups(b)
    opt_head = optim.AdamW(g0["params"], lr=1e-2, weight_decay=0.1)
    opt_body = optim.AdamW([p for p in g1["params"] if p.requires_grad], lr=1e-3, weight_decay=0.0)
    for _ in range(3):
        for net, opts in ((a, [opt]), (b, [opt_head, opt_body])):
            net.zero_grad()
            loss_of(net).backward()
            for o in opts:
                o.step()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_allclose(mg.to_numpy(p.data), mg.to_numpy(q.data), rtol=1e-6, atol=1e-7, err_msg=n)


def test_lr_scale_survives_the_schedule_and_checkpoints(backend):
    net = Net()
    opt = optim.AdamW([{"params": net.head.parameters(), "lr_scale": 10.0},
                       {"params": net.blocks.parameters()}], lr=1e-3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-2, 1e-3])
    opt.set_lr(2e-4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3, 2e-4])
    state = opt.state_dict()
    again = optim.AdamW([{"params": net.head.parameters(), "lr_scale": 10.0},
                         {"params": net.blocks.parameters()}], lr=1e-3)
    again.load_state_dict(state)
    assert [g["lr"] for g in again.param_groups] == pytest.approx([2e-3, 2e-4])


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_shape", [(5, 6), (2, 3, 6), (6,)])
def test_low_rank_update_gradcheck(backend, x_shape):
    x, A, B = t(*x_shape), t(6, 2), t(2, 4)
    out = low_rank_update(x, A, B, 1.5)
    expected = 1.5 * (x.numpy() @ A.numpy()) @ B.numpy()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)
    assert out.shape == x_shape[:-1] + (4,)
    assert gradcheck(lambda x, A, B: low_rank_update(x, A, B, 1.5), x, A, B)
    # the same gradients as autograd derives through two matmuls (the composed twin)
    twins = [Tensor(v.numpy(), requires_grad=True, dtype=np.float64) for v in (x, A, B)]
    for v in (x, A, B):
        v.grad = None
    R = RNG.standard_normal(out.shape)
    low_rank_update(x, A, B, 1.5).backward(R)
    ((twins[0] @ twins[1]) @ twins[2] * 1.5).backward(R)
    for v, w in zip((x, A, B), twins):
        np.testing.assert_allclose(mg.to_numpy(v.grad), mg.to_numpy(w.grad), rtol=1e-12, atol=1e-14)


def test_low_rank_update_skips_frozen_inputs(backend):
    x, A, B = t(3, 6, requires_grad=False), t(6, 2), t(2, 4)
    low_rank_update(x, A, B, 1.0).sum().backward()
    assert x.grad is None and A.grad is not None and B.grad is not None
    A2, B2 = t(6, 2, requires_grad=False), t(2, 4, requires_grad=False)
    assert not low_rank_update(x, A2, B2, 1.0).requires_grad


@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_forward_init_and_gradcheck(backend, bias):
    mg.set_default_dtype(np.float64)
    base = nn.Linear(6, 5, bias=bias)
    layer = LoRALinear.from_linear(base, rank=3, alpha=6.0)
    assert layer.weight is base.weight and layer.bias is base.bias and layer.scale == 2.0
    assert layer.lora_A.shape == (6, 3) and layer.lora_B.shape == (3, 5)
    assert np.all(np.abs(layer.lora_A.numpy()) <= 1 / math.sqrt(3)) and not layer.lora_B.numpy().any()
    x = t(2, 4, 6)
    np.testing.assert_array_equal(layer(x).numpy(), base(x).numpy())  # B = 0: the base layer exactly
    layer.lora_B.data = mg.backend.asarray(RNG.standard_normal((3, 5)))
    expected = base(x).numpy() + 2.0 * (x.numpy() @ layer.lora_A.numpy()) @ layer.lora_B.numpy()
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-12)
    assert [n for n, _ in layer.named_parameters()] == (["weight", "bias"] if bias else ["weight"]) + \
        ["lora_A", "lora_B"]
    assert gradcheck(lambda x, *ps: layer(x), x, *layer.parameters())
    # the usual setting: W and b frozen, only A and B learn (and x still gets its gradient)
    base.requires_grad_(False)
    x.grad = None
    layer(x).sum().backward()
    assert base.weight.grad is None and x.grad is not None
    assert layer.trainable_parameters() == [layer.lora_A, layer.lora_B]
    assert gradcheck(lambda x, A, B: layer(x), x, layer.lora_A, layer.lora_B)


def test_lora_rejects_a_bad_rank(backend):
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(4, 4, rank=0, alpha=1.0)


def test_apply_lora_replaces_every_linear_and_merge_lora_restores_plain_layers(backend):
    mg.set_default_dtype(np.float64)
    net = Net()
    base_names = [n for n, _ in net.named_parameters()]
    weights = {n: p for n, p in net.named_parameters()}
    before = net(IDS).numpy()
    net.requires_grad_(False)
    apply_lora(net, rank=2, alpha=4)
    assert isinstance(net.blocks[0].fc, LoRALinear) and isinstance(net.head, LoRALinear)
    assert net.blocks[1] is list(net.blocks)[1] and isinstance(list(net.blocks)[1].proj, LoRALinear)
    lora_names = [n for n, _ in net.named_trainable_parameters()]
    blocks = [f"blocks.{i}.{m}.lora_{w}" for i in range(2) for m in ("fc", "proj") for w in "AB"]
    assert lora_names == blocks + ["head.lora_A", "head.lora_B"]
    assert all(net.state_dict()[n] is weights[n].data for n in base_names)   # the same weights
    np.testing.assert_array_equal(net(IDS).numpy(), before)                    # B = 0
    apply_lora(net, rank=2, alpha=4)                                           # no double adapting
    assert len(net.trainable_parameters()) == len(lora_names)
    # train the low-rank updates a little: the loss falls, the frozen weights do not move
    frozen = {n: p.numpy().copy() for n, p in net.named_parameters() if not p.requires_grad}
    opt = optim.AdamW(net.trainable_parameters(), lr=0.05, weight_decay=0.0)
    first = None
    for _ in range(20):
        opt.zero_grad()
        loss = loss_of(net)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss_of(net).item() < first
    assert all(np.array_equal(p.numpy(), frozen[n]) for n, p in net.named_parameters() if n in frozen)
    adapted = net(IDS).numpy()
    merge_lora(net)
    assert type(net.head) is nn.Linear and type(net.blocks[0].fc) is nn.Linear
    assert [n for n, _ in net.named_parameters()] == base_names
    np.testing.assert_allclose(net(IDS).numpy(), adapted, rtol=1e-10, atol=1e-12)


def test_apply_lora_include_filter_and_shared_layers(backend):
    net = Net()
    apply_lora(net, rank=2, alpha=2, include=lambda name, layer: name.endswith(".fc"))
    assert isinstance(net.blocks[0].fc, LoRALinear) and not isinstance(net.blocks[0].proj, LoRALinear)
    assert not isinstance(net.head, LoRALinear)
    shared = nn.Linear(3, 3)
    seq = nn.Sequential(shared, nn.Tanh(), shared)
    apply_lora(seq, rank=1, alpha=1)
    assert seq[0] is seq[2] and isinstance(seq[0], LoRALinear)
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "0.lora_A", "0.lora_B"]


def test_lora_on_the_gpt2_model_trains_only_the_updates(backend):
    from gpt2_helpers import tiny_model

    model = tiny_model()
    model.requires_grad_(False)
    apply_lora(model, rank=2, alpha=2)
    ids = np.arange(12).reshape(2, 6) % 64
    logits = model(ids)
    F.cross_entropy(logits, (ids + 1) % 64).backward()
    trainable = dict(model.named_trainable_parameters())
    assert trainable and all(".lora_" in n for n in trainable)
    assert "head.lora_A" in trainable                      # the untied head runs as a module
    assert all(p.grad is not None for p in trainable.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
