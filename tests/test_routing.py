"""Polytropon and MHR against HF PEFT's Poly (also through its checkpoints); MoV and AdaMix against
their equations."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from reference_impls._plumbing import count_parameters
from reference_impls.routing import (
    AdaMixAdapter,
    MoVLinear,
    MTLLoRALinear,
    consistency_loss,
    inject_adamix,
    inject_mov,
    inject_mtl_lora,
    inject_poly,
    use_tasks,
)

from helpers import demo_losses, peft_and_ours, relative_error


class Net(nn.Module):
    """Two odd-width layers that read (batch, tokens, features)."""

    def __init__(self):
        super().__init__()
        self.q, self.o = nn.Linear(12, 18), nn.Linear(18, 6)

    def forward(self, x):
        return self.o(torch.tanh(self.q(x)))


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("training", [False, True])
def test_poly_equals_peft(heads, training):
    """The same skills, logits and random numbers give PEFT's output, in evaluation (sigmoid) and in
    training (relaxed Bernoulli samples) mode."""
    from peft import PolyConfig, get_peft_model

    torch.manual_seed(0)
    base = Net()
    theirs = get_peft_model(
        copy.deepcopy(base), PolyConfig(r=3, n_tasks=4, n_skills=5, n_splits=heads, target_modules=["q", "o"])
    )
    ours = copy.deepcopy(base)
    inject_poly(ours, ["q", "o"], tasks=4, skills=5, r=3, heads=heads)
    with torch.no_grad():
        for name in ("q", "o"):
            hub, mine = theirs.base_model.model.get_submodule(name), ours.get_submodule(name)
            for parameter in (
                hub.poly_lora_A["default"],
                hub.poly_lora_B["default"],
                hub.poly_router["default"].module_logits,
            ):
                parameter.normal_()
            mine.A.copy_(hub.poly_lora_A["default"])
            mine.B.copy_(hub.poly_lora_B["default"])
            mine.logits.copy_(hub.poly_router["default"].module_logits.view(4, heads, 5))
    theirs.train(training)
    ours.train(training)
    x, task_ids = torch.randn(3, 7, 12), torch.tensor([2, 0, 3])
    with torch.no_grad():
        torch.manual_seed(1)
        expected = theirs.base_model(x, task_ids=task_ids)
        torch.manual_seed(1)
        with use_tasks(ours, task_ids):
            got = ours(x)
    assert (expected - base(x)).abs().max() > 1e-2
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_a_peft_poly_checkpoint_loads_and_gives_peft_s_outputs_in_both_modes(heads, dtype, tolerance, tmp_path):
    from peft import PolyConfig

    config = PolyConfig(r=2, n_tasks=3, n_skills=4, n_splits=heads, target_modules=["q", "o"])
    theirs, ours = peft_and_ours(Net, config, tmp_path, std=0.5)
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    x, task_ids = torch.randn(4, 5, 12, dtype=dtype), torch.tensor([2, 0, 1, 2])
    with torch.no_grad():
        with theirs.disable_adapter():
            plain = theirs.base_model(x, task_ids=task_ids)
        for training in (False, True):  # sigmoid weights, then relaxed Bernoulli samples
            theirs.train(training), ours.train(training)
            torch.manual_seed(3)
            expected = theirs.base_model(x, task_ids=task_ids)
            torch.manual_seed(3)
            with use_tasks(ours, task_ids):
                got = ours(x)
            assert (expected - plain).abs().max() > 1e-2
            assert relative_error(got, expected) <= tolerance


def test_poly_counts_starts_as_the_base_model_and_needs_tasks():
    torch.manual_seed(0)
    base = Net()
    model = copy.deepcopy(base)
    inject_poly(model, ["q", "o"], tasks=4, skills=5, r=3, heads=2)
    S, r, T, H = 5, 3, 4, 2
    assert count_parameters(model)[0] == S * r * (12 + 18) + T * H * S + S * r * (18 + 6) + T * H * S
    x = torch.randn(2, 3, 12)
    with torch.no_grad(), use_tasks(model, torch.tensor([1, 3])):
        torch.testing.assert_close(model(x), base(x))
    with pytest.raises(ValueError, match="use_tasks"):
        model(x)
    with pytest.raises(ValueError, match="must divide"):
        inject_poly(Net(), ["q"], tasks=2, skills=2, heads=5)


def test_mov_mixes_ia3_vectors_per_token():
    torch.manual_seed(0)
    base = Net()
    model = copy.deepcopy(base)
    inject_mov(model, ["q"], experts=3)
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x))  # every vector 1, and the router's weights sum to 1
    layer = model.q
    with torch.no_grad():
        layer.vectors.normal_(1, 0.5)
        layer.router.weight.normal_()
        s = torch.softmax(x @ layer.router.weight.T, dim=-1)  # (2, 5, 3): a mix per token
        expected = torch.einsum("bte,en->btn", s, layer.vectors) * base.q(x)
        torch.testing.assert_close(layer(x), expected)
    assert count_parameters(model)[0] == 3 * 18 + 3 * 12  # E·N + E·K
    model(x).sum().backward()
    assert {name for name, p in model.named_parameters() if p.grad is not None} == {"q.router.weight", "q.vectors"}
    assert isinstance(model.q, MoVLinear)


def test_adamix_routes_to_one_copy_while_training_and_averages_them_after():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10))
    inject_adamix(model, ["0"], m=4, copies=3)
    adapter = model[0]
    assert isinstance(adapter, AdaMixAdapter)
    assert count_parameters(model)[0] == 3 * (10 * 4 + 4) + (4 * 10 + 10)
    x = torch.randn(6, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapter.sublayer(x))  # U = 0 at the start
        for parameter in adapter.parameters():
            parameter.normal_()
        h = adapter.sublayer(x)
        candidates = [h + adapter.up(F.gelu(down(h))) for down in adapter.downs]
        for _ in range(10):
            out = model.train()(x)
            assert any(torch.allclose(out, candidate) for candidate in candidates)
        merged_down = nn.Linear(10, 4)
        merged_down.weight.copy_(sum(down.weight for down in adapter.downs) / 3)
        merged_down.bias.copy_(sum(down.bias for down in adapter.downs) / 3)
        torch.testing.assert_close(model.eval()(x), h + adapter.up(F.gelu(merged_down(h))))


def test_consistency_loss_is_a_symmetric_kl():
    p, q = torch.randn(5, 4), torch.randn(5, 4)
    assert consistency_loss(p, p).item() == pytest.approx(0, abs=1e-7)
    assert consistency_loss(p, q).item() == pytest.approx(consistency_loss(q, p).item())
    P, Q = p.softmax(-1), q.softmax(-1)
    kl = lambda a, b: (a * (a / b).log()).sum(-1).mean()  # noqa: E731
    assert consistency_loss(p, q).item() == pytest.approx(((kl(P, Q) + kl(Q, P)) / 2).item(), rel=1e-5)


def test_demo_runs_and_learns(capsys):
    from reference_impls.routing import demo

    demo()
    out = capsys.readouterr().out
    losses = demo_losses(out)
    assert len(losses) == 5 and all(after < 0.8 * before for before, after in losses)
    assert "4.0x fewer heavy FLOPs" in out  # CoDA: 4 of 16 tokens through the heavy blocks


@pytest.mark.parametrize(
    "inject",
    [
        lambda m: inject_poly(m, ["q", "o"], tasks=2, skills=3, r=2, heads=2),
        lambda m: inject_mov(m, ["q", "o"], experts=3),
        lambda m: inject_adamix(m, ["q"], m=4, copies=2),
    ],
)
def test_bfloat16_in_training_and_evaluation(inject):
    model = Net().to(torch.bfloat16)
    inject(model)
    x = torch.randn(2, 5, 12, dtype=torch.bfloat16)
    with use_tasks(model, torch.tensor([0, 1])):
        y = model.train()(x)
        y.float().sum().backward()
        assert y.dtype == model.eval()(x).dtype == torch.bfloat16
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---- CoDA -------------------------------------------------------------------------------------------


def test_soft_top_k_solves_its_problem():
    """λ = min(1, exp((s + a)/ε)) with a such that Σλ = k: found here by bisection, independently."""
    from reference_impls.routing import soft_top_k

    scores = torch.randn(5, 13, dtype=torch.float64)
    for k in (1, 4, 13):
        lam = soft_top_k(scores, k, epsilon=0.1)
        assert torch.allclose(lam.sum(-1), torch.full((5,), float(k), dtype=torch.float64), atol=1e-6)
        assert ((lam >= 0) & (lam <= 1 + 1e-9)).all()
        low, high = torch.full((5, 1), -50.0, dtype=torch.float64), torch.full((5, 1), 50.0, dtype=torch.float64)
        for _ in range(200):
            middle = (low + high) / 2
            total = torch.clamp(torch.exp((scores + middle) / 0.1), max=1).sum(-1, keepdim=True)
            low, high = torch.where(total < k, middle, low), torch.where(total < k, high, middle)
        torch.testing.assert_close(lam, torch.clamp(torch.exp((scores + low) / 0.1), max=1), atol=1e-6, rtol=1e-6)
    order = scores[0].argsort()
    assert (soft_top_k(scores, 4)[0][order].diff() >= -1e-12).all()  # higher score, higher weight


def test_coda_with_every_token_kept_is_the_dense_parallel_adapter():
    from reference_impls.bottleneck import ParallelAdapter
    from reference_impls.routing import ConditionalAdapter

    heavy = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 12))
    coda = ConditionalAdapter(heavy, d=12, m=5, keep=1.0)
    with torch.no_grad():
        coda.adapter.up.weight.normal_()
        coda.router.weight.normal_()
    x = torch.randn(3, 7, 12)
    dense = ParallelAdapter(heavy, coda.adapter)
    torch.testing.assert_close(coda(x), dense(x), rtol=1e-5, atol=1e-5)


def test_coda_sends_only_k_tokens_through_the_heavy_branch():
    from reference_impls.routing import ConditionalAdapter, inject_coda

    seen = []
    heavy = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 12))
    heavy.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape))
    model = nn.ModuleDict({"f": heavy})
    inject_coda(model, ["f"], m=4, keep=0.25)
    coda = model["f"]
    with torch.no_grad():
        coda.adapter.up.weight.normal_()
        coda.router.weight.normal_()
    x = torch.randn(2, 16, 12)
    out = coda(x)
    assert seen == [torch.Size([2, 4, 12])] and coda.heavy_tokens == 8
    lam = __import__("reference_impls.routing", fromlist=["soft_top_k"]).soft_top_k(coda.router(x).squeeze(-1), 4)
    chosen = lam.topk(4, dim=-1).indices
    expected = coda.adapter(x)
    for row in range(2):
        for position in sorted(chosen[row].tolist()):
            expected[row, position] += (
                lam[row, position]
                * heavy(x[row, sorted(chosen[row].tolist())])[sorted(chosen[row].tolist()).index(position)]
            )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert coda.router.weight.grad is not None and coda.router.weight.grad.abs().sum() > 0  # through λ
    assert all(p.grad is None for p in heavy.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * 12 * 4 + 12 + 4 + 12
    assert isinstance(coda, ConditionalAdapter)


def test_coda_runs_in_bf16():
    from reference_impls.routing import TokenMixer, inject_coda

    model = TokenMixer()
    inject_coda(model, ["blocks.0", "blocks.1"], m=8, keep=0.25)
    x = torch.randn(4, 16, 32, dtype=torch.bfloat16)
    assert model.to(torch.bfloat16)(x).dtype == torch.bfloat16


# ---- MTL-LoRA against AdapterHub ----------------------------------------------------------------


def mtl_lora_pair(dtype=torch.float32, up_projections=3, tasks=("t1", "t2", "t3")):
    """AdapterHub's MTL-LoRA (one adapter per task, A and B shared) and ours on the same tiny Llama,
    with the same random non-zero values everywhere."""
    import adapters
    from adapters import MTLLoRAConfig, MultiTask
    from test_interop import tiny_llama

    theirs = tiny_llama().to(dtype)
    ours = copy.deepcopy(theirs)
    adapters.init(theirs)
    config = MTLLoRAConfig(r=4, alpha=6, n_up_projection=up_projections, weights_sharpness=0.5)
    for task in tasks:
        theirs.add_adapter(task, config=config)
    theirs.share_parameters(adapter_names=list(tasks))
    theirs.set_active_adapters(MultiTask(*tasks))
    theirs.to(dtype)
    inject_mtl_lora(ours, ["q_proj", "v_proj"], tasks=len(tasks), r=4, alpha=6, up_projections=up_projections,
                    sharpness=0.5)  # fmt: skip
    shared = ",".join(tasks)
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if not isinstance(layer, MTLLoRALinear):
                continue
            their = theirs.get_submodule(name)
            parameters = their.shared_parameters[shared]
            parameters["lora_A"].normal_(), parameters["lora_B"].normal_()
            layer.A.copy_(parameters["lora_A"]), layer.B.copy_(parameters["lora_B"])
            for t, task in enumerate(tasks):
                lora = their.loras[task]
                lora.task_specific.values.uniform_(0.5, 1.5), lora.weights.normal_()
                layer.task_values[t].copy_(lora.task_specific.values), layer.task_weights[t].copy_(lora.weights)
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mtl_lora_gives_adapterhub_s_logits_row_by_task(dtype):
    ours, theirs = mtl_lora_pair(dtype)
    ids, task_ids = torch.randint(0, 97, (5, 7)), torch.tensor([2, 0, 1, 1, 0])
    with torch.no_grad():
        expected = theirs(input_ids=ids, task_ids=task_ids).logits
        with use_tasks(ours, task_ids):
            got = ours(input_ids=ids).logits
    assert relative_error(got, expected) <= (1e-5 if dtype == torch.float32 else 3e-2)


def test_mtl_lora_counts_the_formula_starts_at_the_base_and_trains_its_own_parameters():
    model = Net()
    plain = copy.deepcopy(model)
    inject_mtl_lora(model, ["q", "o"], tasks=3, r=4, up_projections=2)
    widths = ((12, 18), (18, 6))
    assert count_parameters(model)[0] == sum(4 * K + 2 * N * 4 + 3 * (4 + 2) for K, N in widths)  # rK + nNr + T(r+n)
    x, task_ids = torch.randn(4, 5, 12), torch.tensor([0, 2, 1, 0])
    with use_tasks(model, task_ids):
        torch.testing.assert_close(model(x), plain(x))  # B = 0
        model(x).sum().backward()
    trained = {n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {"A", "B", "task_values", "task_weights"}
    with pytest.raises(ValueError, match="which task is each row"):
        model(x)


def test_adapterhub_s_linear_task_matrix_does_not_build():
    """Why only the diagonal Λ_t is compared: AdapterHub 1.3's "linear" type fails at construction."""
    import adapters
    from adapters import MTLLoRAConfig
    from test_interop import tiny_llama

    model = tiny_llama()
    adapters.init(model)
    with pytest.raises(AttributeError, match="before Module.__init__"):
        model.add_adapter("t1", config=MTLLoRAConfig(r=4, task_specific_matrix_type="linear"))
