"""X-LoRA, Arrow and GenKnowSub against their definitions (the two passes, the per-token weights, the
prototypes as top singular vectors, the subtracted general factors) and against HF PEFT on the same
LoRA experts: `XLoraConfig` in memory (its save drops keys), `create_arrow_model` with and without
`use_gks`."""

import copy

import pytest
import torch
from peft import LoraConfig, XLoraConfig, get_peft_model
from peft.tuners.lora.arrow import ArrowLoraLinearLayer, create_arrow_model
from peft.tuners.lora.config import ArrowConfig
from safetensors.torch import load_file
from test_interop import save_with_nonzero_weights, tiny_llama
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.expert_mixing import ExpertLoRALinear, XLoRA, inject_arrow, inject_experts
from reference_impls.interop import UnsupportedAdapter, load_peft_adapter
from reference_impls.lora import inject_lora

from helpers import demo_losses, relative_error, run_demo

TARGETS = ["q_proj", "v_proj", "down_proj"]


def no_cache_llama():
    model = tiny_llama()
    model.config.use_cache = False  # X-LoRA's two passes need it off
    return model


@pytest.fixture
def expert_dirs(tmp_path):
    """Three LoRA experts (and one general LoRA) on the tiny Llama, saved by PEFT with non-zero weights,
    each its own (the model's construction reseeds the generator: the seed is set after it)."""

    def reseeded(seed):
        def make():
            model = no_cache_llama()
            torch.manual_seed(seed)
            return model

        return make

    dirs = []
    for i in range(4):
        config = LoraConfig(r=4, lora_alpha=8 + 4 * i, target_modules=TARGETS)
        save_with_nonzero_weights(reseeded(10 + i), config, tmp_path / f"expert{i}")
        dirs.append(tmp_path / f"expert{i}")
    return dirs


def our_experts(dirs):
    return [load_peft_adapter(no_cache_llama(), directory) for directory in dirs]


# ---- X-LoRA -------------------------------------------------------------------------------------

XLORA_CASES = {
    "dense, one layer": {"xlora_depth": 1},
    "layerwise, deep, top-1": {
        "xlora_depth": 3,
        "xlora_size": 16,
        "layerwise_scalings": True,
        "top_k_lora": 1,
        "enable_softmax_topk": True,
        "enable_softmax": False,
    },
    "scaling pass, weight, temperature": {
        "xlora_depth": 2,
        "xlora_size": 8,
        "scaling_pass_value": 0.5,
        "global_scaling_weight": 2.0,
        "softmax_temperature": 0.5,
        "top_k_lora": 2,
    },
}
OPTION_NAMES = {
    "xlora_depth": "depth",
    "xlora_size": "size",
    "layerwise_scalings": "layerwise",
    "top_k_lora": "top_k",
    "enable_softmax_topk": "softmax_top_k",
    "enable_softmax": "softmax",
    "scaling_pass_value": "scaling_pass_value",
    "global_scaling_weight": "global_weight",
    "softmax_temperature": "temperature",
}


def xlora_pair(options, dirs):
    torch.manual_seed(0)
    config = XLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=32,
        adapters={str(i): str(d) for i, d in enumerate(dirs)},
        xlora_dropout_p=0.3,
        **options,
    )
    theirs = get_peft_model(no_cache_llama(), config)
    ours = XLoRA(
        no_cache_llama(),
        our_experts(dirs),
        hidden_size=32,
        dropout=0.3,
        **{OPTION_NAMES[k]: v for k, v in options.items()},
    )
    ours.classifier.load_state_dict(theirs.base_model.internal_xlora_classifier.layers.state_dict())
    return ours, theirs


@pytest.mark.parametrize("case", list(XLORA_CASES))
def test_xlora_gives_the_in_memory_peft_model_s_logits(case, expert_dirs):
    ours, theirs = xlora_pair(XLORA_CASES[case], expert_dirs[:3])
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        assert relative_error(ours(input_ids=ids).logits, expected) <= 1e-5
        their_weights = theirs.base_model.internal_xlora_scalings
        assert relative_error(ours.last_weights, their_weights) <= 1e-5
    if XLORA_CASES[case]["xlora_depth"] > 1:  # the classifier's dropout, with the same seed
        ours.train(), theirs.train()
        torch.manual_seed(7)
        dropped = theirs(input_ids=ids).logits
        torch.manual_seed(7)
        assert relative_error(ours(input_ids=ids).logits, dropped) <= 1e-5
        assert relative_error(dropped, expected) > 1e-4  # the dropout did something


def test_xlora_trains_its_classifier_only_and_counts_it(expert_dirs):
    ours, _ = xlora_pair({"xlora_depth": 3, "xlora_size": 16, "layerwise_scalings": True}, expert_dirs[:3])
    L, E = 2 * len(TARGETS), 3
    assert len(ours.names) == L
    expected = 32 * 16 + 16 + 16 * 16 + 16 + 16 * E * L + E * L  # hidden·size + … + size·E·L + E·L
    assert count_parameters(ours)[0] == expected
    ids = torch.randint(0, 97, (2, 9))
    ours(input_ids=ids, labels=ids).loss.backward()
    assert {n.split(".")[0] for n, p in ours.named_parameters() if p.grad is not None} == {"classifier"}


def test_the_scaling_pass_at_weight_zero_is_the_base_model(expert_dirs):
    """With c = 0 the classifier reads the frozen model's own last hidden state."""
    ours, _ = xlora_pair({"xlora_depth": 1}, expert_dirs[:2])
    base = no_cache_llama()
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        ours(input_ids=ids)
        hidden = base(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(ours.last_weights[..., 0, :], torch.softmax(ours.classifier(hidden), -1))


def test_peft_s_xlora_save_drops_the_classifier_s_first_layer(expert_dirs, tmp_path):
    """Why the comparison is with the model in memory: PEFT 0.21.2 saves no key containing ".0."."""
    _, theirs = xlora_pair({"xlora_depth": 2, "xlora_size": 8}, expert_dirs[:2])
    theirs.save_pretrained(tmp_path / "xlora")
    saved = load_file(str(tmp_path / "xlora" / "adapter_model.safetensors"))
    in_memory = theirs.base_model.internal_xlora_classifier.layers.state_dict()
    assert "0.weight" in in_memory and not any(".0." in key or key.startswith("0.") for key in saved)
    with pytest.raises(UnsupportedAdapter, match="lack the classifier's first layer"):
        load_peft_adapter(no_cache_llama(), tmp_path / "xlora")


# ---- Arrow and GenKnowSub -----------------------------------------------------------------------


@pytest.mark.parametrize("gks", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
def test_arrow_gives_peft_s_logits(gks, top_k, expert_dirs, monkeypatch):
    # PEFT's prototypes come from 15 power iterations; with more they are the exact top singular vectors
    monkeypatch.setattr(ArrowLoraLinearLayer.top_right_singular_vec_from_BA, "__defaults__", (2000, 1e-8))
    tasks, general = expert_dirs[:3], expert_dirs[3:] if gks else []
    config = ArrowConfig(top_k=top_k, router_temperature=0.7, use_gks=gks, rng_seed=0)
    theirs = create_arrow_model(
        no_cache_llama(), [str(d) for d in tasks], config, general_adapter_paths=[str(d) for d in general] or None
    ).eval()
    ours = no_cache_llama()
    inject_arrow(ours, our_experts(tasks), top_k=top_k, temperature=0.7, general=our_experts(general))
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert relative_error(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) <= 1e-5


def test_arrow_s_prototype_is_the_direction_an_expert_amplifies_most():
    base = nn.Linear(6, 5)
    expert = nn.Sequential(copy.deepcopy(base))
    inject_lora(expert, ["0"], r=2)
    with torch.no_grad():
        expert[0].B.normal_()
    model = nn.Sequential(base)
    inject_arrow(model, [expert], top_k=1)
    layer = model[0]
    v = layer.router.prototypes[0]
    delta = expert[0].delta_weight() / expert[0].scale
    assert torch.linalg.vector_norm(delta @ v).item() == pytest.approx(
        torch.linalg.matrix_norm(delta, ord=2).item(), rel=1e-4
    )


def test_arrow_s_prototypes_move_with_the_model():
    plain = nn.Sequential(nn.Linear(6, 5))
    expert = copy.deepcopy(plain)
    inject_lora(expert, ["0"], r=2)
    model = copy.deepcopy(plain)
    inject_arrow(model, [expert], top_k=1)
    model.to(torch.float64)
    assert model[0].router.prototypes.dtype == torch.float64
    assert model(torch.randn(2, 6, dtype=torch.float64)).dtype == torch.float64


def test_experts_must_cover_the_same_layers():
    plain = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    first, second, third = (copy.deepcopy(plain) for _ in range(3))
    inject_lora(first, ["0"], r=1)
    inject_lora(second, ["1"], r=1)
    inject_lora(third, ["1"], r=1)
    with pytest.raises(ValueError, match="same layers"):
        inject_experts(copy.deepcopy(plain), [first, second])
    model = copy.deepcopy(plain)
    inject_experts(model, [second, third])
    assert isinstance(model[1], ExpertLoRALinear) and isinstance(model[0], nn.Linear)


def test_demo_learns():
    output = run_demo("reference_impls.expert_mixing")
    ((before, after),) = demo_losses(output)
    assert after < before / 20
    arrow = float(output.split("arrow (top-1 of 2 experts, nothing trained): loss on the mixture ")[1].split()[0])
    alone = [float(line.rsplit(" ", 1)[1]) for line in output.splitlines() if " alone: " in line]
    assert arrow < min(alone)  # routing by the prototypes beats either expert alone
