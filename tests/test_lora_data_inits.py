"""EVA, CorDA and LoRA-GA against their definitions (the inputs' principal directions and their
shared rank budget, the covariance-weighted SVD, the gradient's singular vectors, the residual base)
and against HF PEFT: the same starting factors, ranks and residual weights from the same batches as
`initialize_lora_eva_weights`, `preprocess_corda` and `preprocess_loraga`; EVA checkpoints and
CorDA/LoRA-GA ones converted to plain LoRA load and give PEFT's logits."""

import copy
import json

import pytest
import torch
from peft import EvaConfig, LoraConfig, LoraGAConfig, get_peft_model, initialize_lora_eva_weights
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda
from peft.tuners.lora.loraga import preprocess_loraga
from test_interop import tiny_llama
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.interop import UnsupportedAdapter, load_peft_adapter
from reference_impls.lora import LoRALinear, merge_lora, unmerge_lora
from reference_impls.lora_data_inits import (
    IncrementalPCA,
    corda_covariances,
    eva_components,
    full_gradients,
    inject_corda,
    inject_eva,
    inject_lora_ga,
)

from helpers import assert_merge_round_trip, demo_losses, relative_error, run_demo


class SharedInput(nn.Module):
    """q, k and v read the same input (EVA gives them one decomposition); odd widths on purpose."""

    def __init__(self, d=21, h=11, d_out=9):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(d, h)
        self.out = nn.Linear(3 * h, d_out)

    def forward(self, x):
        return self.out(torch.cat([self.q(x), self.k(x), self.v(x)], -1).tanh())


LAYERS = ["q", "k", "v", "out"]


def correlated_batches(count=6, rows=(4, 10), d=21, seed=0):
    """Batches of (rows) tokens whose spectrum decays, so the leading components settle quickly."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=generator) * torch.logspace(0, -2, d)[:, None]
    return [torch.randn(*rows, d, generator=generator) @ mixing for _ in range(count)]


def lora_layers(peft_model):
    return {name: m for name, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")}


# ---- EVA ----------------------------------------------------------------------------------------


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.narrow, self.wide = nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, x):
        narrow, wide = x[..., :16].contiguous(), x[..., 16:].contiguous()  # PEFT's EVA hashes views of them
        return self.narrow(narrow) + self.wide(wide)


def narrow_and_wide_batches(count=8, rows=64):
    """The first 16 features nearly on one direction, the last 16 isotropic."""
    generator = torch.Generator().manual_seed(1)
    direction = torch.randn(1, 16, generator=generator)
    return [
        torch.cat(
            [
                torch.randn(rows, 1, generator=generator) @ direction
                + 1e-3 * torch.randn(rows, 16, generator=generator),
                torch.randn(rows, 16, generator=generator),
            ],
            1,
        )
        for _ in range(count)
    ]


def test_the_incremental_pca_finds_the_components_of_all_the_batches_together():
    """Exactly so when it keeps every component (truncating to k drops a little each batch)."""
    batches = correlated_batches(count=5, rows=(40,))
    pca = IncrementalPCA(k=21)
    for X in batches:
        pca.update(X)
    X = torch.cat(batches).double()
    centred = X - X.mean(0)
    _, S, Vh = torch.linalg.svd(centred, full_matrices=False)
    cosines = (pca.components[:4].double() * Vh[:4]).sum(1).abs()
    assert torch.all(cosines > 1 - 1e-5)  # the same directions (up to sign)
    ratios = pca.explained_variance_ratio[:4].double()
    torch.testing.assert_close(ratios, S[:4] ** 2 / centred.square().sum(), rtol=1e-5, atol=0)


EVA_CASES = {  # q, k, v sharing one input; two layers between which the budget moves
    "shared": (SharedInput, LAYERS, correlated_batches),
    "moved": (TwoInputs, ["narrow", "wide"], narrow_and_wide_batches),
}


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("rho", [1.0, 2.0])
@pytest.mark.parametrize("case", list(EVA_CASES))
def test_eva_gives_peft_s_components_ranks_and_scales(case, rho, whiten):
    make_model, layers, make_batches = EVA_CASES[case]
    torch.manual_seed(2)
    base, batches = make_model(), make_batches()
    ours = copy.deepcopy(base)
    config = LoraConfig(
        r=3, lora_alpha=6, target_modules=layers, init_lora_weights="eva", eva_config=EvaConfig(rho=rho, whiten=whiten)
    )
    theirs = get_peft_model(base, config)
    initialize_lora_eva_weights(
        theirs,
        batches,
        forward_fn=lambda model, x: model(x),
        prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=None,
        show_progress_bar=False,
    )
    components = eva_components(ours, layers, batches, r=3, rho=rho, whiten=whiten)
    inject_eva(ours, components, r=3, alpha=6)
    their_layers = lora_layers(theirs)
    ranks = {name: A.shape[0] for name, A in components.items()}
    assert sum(ranks.values()) == 3 * len(layers)  # the budget, redistributed
    if case == "moved" and rho > 1:
        assert ranks["narrow"] < 3 < ranks["wide"]
    assert {name for name, k in ranks.items() if k} == set(their_layers)  # rank 0: no LoRA, as PEFT
    for name, their in their_layers.items():
        layer = ours.get_submodule(name)
        assert layer.r == their.r["default"] and layer.scale == pytest.approx(their.scaling["default"])
        their_A = their.lora_A["default"].weight
        if whiten and name in ("q", "k", "v"):
            # PEFT divides the one tensor q, k and v share in place, once per layer: by S^{3/2}, not S^{1/2}
            their_A = their_A * eva_singular_values(ours, batches, rho)[: layer.r, None]
        assert relative_error(layer.A, their_A) <= 1e-5
        assert not layer.B.any() and not their.lora_B["default"].weight.any()
    x = batches[0]
    torch.testing.assert_close(ours(x), theirs(x))  # B = 0: both compute W₀ x


def eva_singular_values(model, batches, rho):
    """The singular values of q's (shared) incremental PCA, fed as eva_components feeds it."""
    pca = IncrementalPCA(round(3 * rho))
    inputs = [X.flatten(0, -2) for X in batches]
    previous = None
    for X in inputs:  # the batches, until the three components stop moving (as in eva_components)
        pca.update(X)
        if previous is not None and (torch.cosine_similarity(pca.components, previous, dim=1) >= 0.99).all():
            break
        previous = pca.components
    return pca.singular_values.float()


def test_eva_counts_the_budget_trains_a_and_b_and_merges():
    model = SharedInput()
    components = eva_components(model, LAYERS, correlated_batches(), r=3)
    inject_eva(model, components, r=3, alpha=6)
    k = {name: A.shape[0] for name, A in components.items()}
    widths = {"q": (21, 11), "k": (21, 11), "v": (21, 11), "out": (33, 9)}
    assert count_parameters(model)[0] == sum(k[name] * sum(widths[name]) for name in widths)  # Σ k (d_in + d_out)
    model(torch.randn(2, 5, 21)).sum().backward()
    assert {n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.grad is not None} == {"A", "B"}
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            with torch.no_grad():
                layer.B.normal_()
    assert_merge_round_trip(model, merge_lora, unmerge_lora, torch.randn(4, 21))


def test_eva_layers_with_wide_inputs_get_more_of_the_budget():
    """One layer fed nearly rank-1 inputs, one fed isotropic ones: the budget goes to the second."""
    batches = narrow_and_wide_batches()
    components = eva_components(TwoInputs(), ["narrow", "wide"], batches, r=4, rho=2.0, tau=0.5)
    assert components["narrow"].shape[0] <= 2 and components["wide"].shape[0] >= 6


def test_an_eva_checkpoint_loads_with_its_ranks_and_scales(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights="eva")
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    theirs = get_peft_model(base, config)
    batches = [{"input_ids": torch.randint(0, 97, (2, 12))} for _ in range(4)]
    initialize_lora_eva_weights(theirs, batches, show_progress_bar=False)
    assert theirs.peft_config["default"].rank_pattern  # ranks were moved between layers
    with torch.no_grad():
        for parameter in theirs.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.3)
    theirs.eval().save_pretrained(tmp_path)
    ours = load_peft_adapter(fresh, tmp_path)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert relative_error(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) <= 1e-5


def test_eva_that_never_converges_stops_with_a_clear_error():
    batches = [torch.randn(40, 21) for _ in range(3)]  # fresh noise: components keep moving
    with pytest.raises(ValueError, match="did not converge"):
        eva_components(SharedInput(), LAYERS, batches, r=3, tau=0.999999, max_batches=20)


# ---- CorDA --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_corda_gives_peft_s_factors_and_residual(mode, dtype):
    torch.manual_seed(3)
    base = SharedInput().to(dtype)
    ours = copy.deepcopy(base)
    batches = [X.to(dtype) for X in correlated_batches(rows=(30,))]

    def run_model(model):
        return lambda: [model(X) for X in batches]

    config = LoraConfig(
        r=3, lora_alpha=5, target_modules=LAYERS, init_lora_weights="corda", corda_config=CordaConfig(corda_method=mode)
    )
    preprocess_corda(base, config, run_model=run_model(base))
    theirs = get_peft_model(base, config)
    inject_corda(ours, corda_covariances(ours, LAYERS, run_model(ours)), mode, r=3, alpha=5)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for name, their in lora_layers(theirs).items():
        layer = ours.get_submodule(name)
        assert relative_error(layer.A, their.lora_A["default"].weight) <= tolerance
        assert relative_error(layer.B, their.lora_B["default"].weight) <= tolerance
        assert relative_error(layer.base.weight, their.base_layer.weight) <= tolerance


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_starts_at_the_weight_and_adapts_the_components_the_inputs_use(mode):
    plain = SharedInput()
    model = copy.deepcopy(plain)
    batches = correlated_batches(rows=(30,))
    covariances = corda_covariances(model, LAYERS, lambda: [model(X) for X in batches])
    inject_corda(model, covariances, mode, r=3, alpha=5)
    x = torch.randn(4, 21)
    torch.testing.assert_close(model(x), plain(x))  # W₀ + s·BA = W
    layer, W = model.q, plain.q.weight
    X = torch.cat(batches)
    energy = (X @ layer.delta_weight().T).norm() / (X @ W.T).norm()  # how much of W's output on the data
    assert energy > 0.5 if mode == "ipm" else energy < 0.2


# ---- LoRA-GA ------------------------------------------------------------------------------------


def exact_svd_lowrank(A, q=6, niter=2, M=None):
    """torch.svd_lowrank's result made exact: PEFT's LoRA-GA then computes what the paper's SVD does."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[:, :q], S[:q], Vh[:q].T


def lora_ga_pair(direction, scale, monkeypatch, dtype=torch.float32):
    torch.manual_seed(4)
    base = SharedInput().to(dtype)
    ours = copy.deepcopy(base)
    batches = [(X.to(dtype), torch.randn(10, 9, dtype=dtype)) for X in correlated_batches(count=2, rows=(10,))]

    def train_step(model):
        def step():
            for X, y in batches:
                nn.functional.mse_loss(model(X), y).backward()

        return step

    config = LoraConfig(
        r=2,
        lora_alpha=6,
        target_modules=LAYERS,
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(direction=direction, scale=scale),
    )
    preprocess_loraga(base, config, train_step(base))
    their_gradients = {name: base.get_submodule(name)._peft_loraga_grad.clone() for name in LAYERS}
    with monkeypatch.context() as patch:
        patch.setattr(torch, "svd_lowrank", exact_svd_lowrank)
        theirs = get_peft_model(base, config)
    gradients = full_gradients(ours, LAYERS, train_step(ours))
    for name in LAYERS:
        torch.testing.assert_close(gradients[name], their_gradients[name])
    inject_lora_ga(ours, gradients, direction, scale, r=2, alpha=6)
    return ours, theirs


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr"])
@pytest.mark.parametrize("scale", ["stable", "weight_svd", "gd_scale", "unit"])
def test_lora_ga_gives_peft_s_factors_and_residual(direction, scale, monkeypatch):
    ours, theirs = lora_ga_pair(direction, scale, monkeypatch)
    for name, their in lora_layers(theirs).items():
        layer = ours.get_submodule(name)
        torch.testing.assert_close(layer.A, their.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.B, their.lora_B["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.base.weight, their.base_layer.weight, rtol=1e-5, atol=1e-6)


def test_lora_ga_in_bf16_is_peft_s(monkeypatch):
    ours, theirs = lora_ga_pair("ArB2r", "stable", monkeypatch, torch.bfloat16)
    for name, their in lora_layers(theirs).items():
        assert relative_error(ours.get_submodule(name).B, their.lora_B["default"].weight) <= 1e-2
        assert relative_error(ours.get_submodule(name).base.weight, their.base_layer.weight) <= 1e-2


def test_lora_ga_s_first_step_follows_the_full_gradient():
    """s·BA's first gradient step, −η s (∇_B A + B ∇_A), points along −G far more than a random start's."""
    torch.manual_seed(5)
    plain = SharedInput()
    X, y = torch.randn(40, 21), torch.randn(40, 9)
    loss = lambda model: nn.functional.mse_loss(model(X), y)  # noqa: E731
    model = copy.deepcopy(plain)
    G = full_gradients(model, ["out"], lambda: loss(model).backward())["out"]
    inject_lora_ga(model, {"out": G}, r=4, alpha=8, scale="unit")
    torch.testing.assert_close(model(X), plain(X))  # W₀ + s·BA = W
    loss(model).backward()
    layer = model.out
    step = layer.scale * (layer.B.grad @ layer.A + layer.B @ layer.A.grad)
    cosine = torch.nn.functional.cosine_similarity(step.flatten(), G.flatten(), dim=0)
    assert cosine > 0.6


def test_lora_ga_refuses_a_rank_above_half_the_width():
    model = nn.Sequential(nn.Linear(5, 4))
    G = full_gradients(model, ["0"], lambda: model(torch.randn(3, 5)).sum().backward())
    with pytest.raises(ValueError, match="2r = 6"):
        inject_lora_ga(model, G, r=3)


@pytest.mark.parametrize("init", ["corda", "lora_ga"])
def test_a_checkpoint_converted_to_plain_lora_loads_and_gives_the_trained_model_s_logits(init, tmp_path):
    """PEFT's way to share a CorDA or LoRA-GA adapter: save the start, then the trained adapter with
    path_initial_model_for_weight_conversion (rank 2r, onto the original base). Ours gives the logits of
    the trained in-memory PEFT model, whose base is the residual."""
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    ids = torch.randint(0, 97, (2, 12))
    options = {"corda_config": CordaConfig()} if init == "corda" else {"lora_ga_config": LoraGAConfig()}
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights=init, **options)
    if init == "corda":
        preprocess_corda(base, config, run_model=lambda: base(input_ids=ids[:1]))
    else:
        preprocess_loraga(base, config, lambda: base(input_ids=ids, labels=ids).loss.backward())
    theirs = get_peft_model(base, config)
    theirs.peft_config["default"].init_lora_weights = True
    theirs.save_pretrained(tmp_path / "start")
    theirs.peft_config["default"].init_lora_weights = init
    with torch.no_grad():
        for parameter in theirs.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn_like(parameter))  # "training"
    theirs.eval().save_pretrained(tmp_path / "trained", path_initial_model_for_weight_conversion=tmp_path / "start")
    assert json.loads((tmp_path / "trained" / "adapter_config.json").read_text())["r"] == 4
    ours = load_peft_adapter(fresh, tmp_path / "trained")
    with torch.no_grad():
        assert relative_error(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) <= 1e-5
    with pytest.raises(UnsupportedAdapter, match=f"init_lora_weights = '{init}'"):  # unconverted: refused
        theirs.save_pretrained(tmp_path / "raw")
        load_peft_adapter(tiny_llama(), tmp_path / "raw")


def test_demo_learns():
    output = run_demo("reference_impls.lora_data_inits")
    for before, after in demo_losses(output):
        assert after < before / 20
