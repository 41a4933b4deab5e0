"""Adapters saved by HF PEFT from tiny transformers models load into our modules and give the same logits."""

import copy
import json

import pytest
import torch
from peft import (
    AdaLoraConfig,
    AdamssConfig,
    BeftConfig,
    BOFTConfig,
    C3AConfig,
    DeftConfig,
    DeloraConfig,
    FourierFTConfig,
    FrodConfig,
    GraloraConfig,
    HiraConfig,
    HRAConfig,
    IA3Config,
    LilyConfig,
    LNTuningConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    MissConfig,
    OFTConfig,
    OSFConfig,
    PeanutConfig,
    PsoftConfig,
    PveraConfig,
    RandLoraConfig,
    RoadConfig,
    ShiraConfig,
    SupertuningConfig,
    TinyLoraConfig,
    TrainableTokensConfig,
    UniLoraConfig,
    VBLoRAConfig,
    VeraConfig,
    WaveFTConfig,
    get_peft_model,
)
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from reference_impls.interop import UnsupportedAdapter, load_peft_adapter, save_peft_adapter


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=44,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


CASES = {
    "lora": (tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "rslora": (tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True)),
    "rank_and_alpha_pattern": (
        tiny_llama,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "up_proj"],
            rank_pattern={"layers.0.self_attn.q_proj": 2, "up_proj": 6},
            alpha_pattern={"v_proj": 3, "layers.1.mlp.up_proj": 12},
        ),
    ),
    "lora_bias_gpt2": (
        tiny_gpt2,
        LoraConfig(r=3, lora_bias=True, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    ),
    "lora_gpt2_fan_in_fan_out": (
        tiny_gpt2,
        LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    ),
    "dora": (tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], use_dora=True)),
    "vera": (tiny_llama, VeraConfig(r=8, target_modules=["q_proj", "v_proj"], projection_prng_key=7)),
    "ia3": (tiny_llama, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "adalora": (
        tiny_llama,
        AdaLoraConfig(init_r=6, target_r=2, lora_alpha=8, total_step=10, target_modules=["q_proj", "v_proj"]),
    ),
    "loha": (
        tiny_llama,
        LoHaConfig(
            r=4,
            alpha=6,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"down_proj": 3},
            alpha_pattern={"layers.1.self_attn.v_proj": 2},
        ),
    ),
    # q_proj (32 → 32): C is 4 × 4 and r = 4 ≥ 8/2, so W₂ is a full 8 × 8; down_proj (44 → 32): W₂ = B A, 8 × 11.
    "lokr": (
        tiny_llama,
        LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 2}),
    ),
    "lokr_decompose_both": (
        tiny_llama,
        LoKrConfig(r=1, alpha=3, target_modules=["k_proj", "up_proj"], decompose_both=True, decompose_factor=8),
    ),
    "hira": (tiny_llama, HiraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"])),
    "hira_gpt2_fan_in_fan_out": (tiny_gpt2, HiraConfig(r=3, target_modules=["c_attn"], fan_in_fan_out=True)),
    "delora": (
        tiny_llama,
        DeloraConfig(r=4, delora_lambda=5, target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 2}),
    ),
    # OFT's default is the 5-term Cayley–Neumann series; down_proj's 44 inputs take blocks of 11 (PEFT adjusts 8).
    "oft_neumann": (tiny_llama, OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "oft_exact_cayley_coft": (
        tiny_llama,
        OFTConfig(oft_block_size=8, use_cayley_neumann=False, coft=True, eps=1.0, target_modules=["q_proj", "up_proj"]),
    ),
    "oft_block_share": (
        tiny_llama,
        OFTConfig(
            r=4,
            oft_block_size=0,
            block_share=True,
            num_cayley_neumann_terms=7,
            target_modules=["k_proj", "o_proj"],
        ),
    ),
    "boft_butterfly": (
        tiny_llama,
        BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=3, target_modules=["q_proj", "o_proj"]),
    ),
    "boft_block_num": (
        tiny_llama,
        BOFTConfig(
            boft_block_num=4, boft_block_size=0, boft_n_butterfly_factor=1, target_modules=["v_proj", "down_proj"]
        ),
    ),
    "hra": (tiny_llama, HRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "road_1": (
        tiny_llama,
        RoadConfig(variant="road_1", group_size=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
    "road_2": (tiny_llama, RoadConfig(variant="road_2", group_size=4, target_modules=["k_proj", "up_proj"])),
    "road_4": (tiny_llama, RoadConfig(variant="road_4", group_size=16, target_modules=["q_proj", "o_proj"])),
    "osf": (tiny_llama, OSFConfig(effective_rank=6, target_modules=["q_proj", "v_proj", "down_proj"])),
    "psoft": (tiny_llama, PsoftConfig(r=6, psoft_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"])),
    "psoft_neumann_pissa_free": (
        tiny_llama,
        PsoftConfig(
            r=5,
            ab_svd_init="pissa_init",
            use_cayley_neumann=True,
            cayley_neumann_eps=0.5,
            psoft_mag_a=False,
            target_modules=["k_proj", "up_proj"],
        ),
    ),
    "psoft_not_orthogonal": (
        tiny_llama,
        PsoftConfig(r=4, psoft_orth=False, psoft_mag_b=False, target_modules=["q_proj", "o_proj"]),
    ),
    "deft": (tiny_llama, DeftConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "deft_qr_alpha": (
        tiny_llama,
        DeftConfig(r=3, decomposition_method="qr", alpha=6, target_modules=["k_proj", "up_proj"]),
    ),
    "deft_para": (tiny_llama, DeftConfig(r=4, para=True, target_modules=["q_proj", "o_proj"])),
    "frod": (tiny_llama, FrodConfig(sparse_rate=0.05, target_modules=["q_proj", "v_proj", "down_proj"])),
    "frod_gpt2_fan_in_fan_out": (
        tiny_gpt2,
        FrodConfig(sparse_rate=0.02, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    ),
    "fourierft": (
        tiny_llama,
        FourierFTConfig(
            n_frequency=60,
            scaling=300.0,
            target_modules=["q_proj", "v_proj", "down_proj"],
            n_frequency_pattern={"down_proj": 90},
        ),
    ),
    "fourierft_gpt2_fan_in_fan_out": (
        tiny_gpt2,
        FourierFTConfig(
            n_frequency=80, scaling=300.0, random_loc_seed=5, target_modules=["c_attn"], fan_in_fan_out=True
        ),
    ),
    "waveft": (
        tiny_llama,
        WaveFTConfig(n_frequency=60, scaling=20.0, target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
    "waveft_gpt2_fan_in_fan_out": (
        tiny_gpt2,
        WaveFTConfig(n_frequency=80, wavelet_family="db2", target_modules=["c_attn"], fan_in_fan_out=True),
    ),
    "tinylora": (
        tiny_llama,
        TinyLoraConfig(r=2, u=7, weight_tying=0.5, target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
    "tinylora_gpt2_fan_in_fan_out": (
        tiny_gpt2,
        TinyLoraConfig(r=3, u=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    ),
    "supertuning_supra": (
        tiny_llama,
        SupertuningConfig(sparsity=0.95, r=2, target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
    "adamss_without_biases": (
        tiny_llama,
        AdamssConfig(r=12, num_subspaces=3, subspace_rank=2, target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
    "c3a": (tiny_llama, C3AConfig(block_size=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "ln_tuning": (tiny_llama, LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm", "norm"])),
    "ln_tuning_gpt2_layernorm": (tiny_gpt2, LNTuningConfig(target_modules=["ln_1", "ln_f"])),
    "beft_creates_value_biases": (tiny_llama, BeftConfig()),
    "shira": (tiny_llama, ShiraConfig(r=2, random_seed=3, target_modules=["q_proj", "v_proj", "down_proj"])),
    "trainable_tokens": (tiny_llama, TrainableTokensConfig(token_indices=[3, 5, 96])),
    "pvera": (tiny_llama, PveraConfig(r=4, target_modules=["q_proj", "down_proj"], projection_prng_key=3)),
    "vblora": (
        tiny_llama,
        VBLoRAConfig(r=2, num_vectors=12, vector_length=4, topk=3, target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
    "vblora_only_topk_saved": (
        tiny_llama,
        VBLoRAConfig(r=2, num_vectors=10, vector_length=4, save_only_topk_weights=True, target_modules=["q_proj"]),
    ),
    # q_proj 32 → 32 (4 bases), k_proj 32 → 16 (d_in > d_out: transposed, 2 bases), down_proj 44 → 32.
    "randlora": (tiny_llama, RandLoraConfig(r=8, randlora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"])),
    "randlora_sparse": (tiny_llama, RandLoraConfig(r=6, sparse=True, target_modules=["v_proj", "up_proj"])),
    "unilora_indices_redrawn": (
        tiny_llama,
        UniLoraConfig(r=2, theta_d_length=50, target_modules=["q_proj", "v_proj", "down_proj"], proj_seed=7),
    ),
    "unilora_indices_saved": (
        tiny_llama,
        UniLoraConfig(r=3, theta_d_length=40, save_indices=True, target_modules=["k_proj", "up_proj"]),
    ),
    # 44 = 5·8 + 4: down_proj's last shard is zero-padded.
    "miss": (tiny_llama, MissConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "miss_mini": (tiny_llama, MissConfig(r=4, init_weights="mini", mini_r=8, target_modules=["q_proj", "o_proj"])),
    "miss_bat": (tiny_llama, MissConfig(r=4, init_weights="bat", target_modules=["q_proj", "k_proj", "down_proj"])),
    "gralora": (
        tiny_llama,
        GraloraConfig(r=8, alpha=16, gralora_k=2, target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
    "gralora_hybrid": (
        tiny_llama,
        GraloraConfig(r=8, alpha=12, gralora_k=4, hybrid_r=2, target_modules=["q_proj", "up_proj"]),
    ),
    "peanut": (tiny_llama, PeanutConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "peanut_deep_gelu": (
        tiny_llama,
        PeanutConfig(r=4, depth=2, act_fn="gelu", scaling=0.5, target_modules=["k_proj", "up_proj"]),
    ),
    "lily": (tiny_llama, LilyConfig(r=4, num_B=3, stride_A=2, target_modules=["q_proj", "v_proj", "down_proj"])),
    "hra_gram_schmidt": (tiny_llama, HRAConfig(r=3, apply_GS=True, target_modules=["k_proj", "up_proj"])),
}


def save_with_nonzero_weights(make_model, config, directory):
    base = make_model()
    fresh = copy.deepcopy(base)
    peft_model = get_peft_model(base, copy.deepcopy(config)).eval()
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad:  # the adapter's own tensors: give them non-zero values
                parameter.uniform_(0.5, 1.5) if any(
                    k in name for k in ("magnitude", "ia3", "boft_s")
                ) else parameter.normal_(0, 0.3)
    peft_model.save_pretrained(directory)
    return peft_model, fresh


@pytest.mark.parametrize("case", list(CASES))
def test_peft_checkpoint_loads_and_gives_the_same_logits(case, tmp_path):
    make_model, config = CASES[case]
    peft_model, fresh = save_with_nonzero_weights(make_model, config, tmp_path)
    ours = load_peft_adapter(fresh, tmp_path)
    input_ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        expected = peft_model(input_ids=input_ids).logits
        got = ours(input_ids=input_ids).logits
        untouched = make_model()(input_ids=input_ids).logits
    assert (expected - untouched).abs().max() > 1e-2  # the adapter really changes the output
    relative = ((got - expected).norm() / expected.norm()).item()
    assert relative <= 1e-5, f"{case}: relative error {relative:.2e}"


# Methods with training-time randomness: the same seed must give PEFT's logits in training mode too.
TRAINING_CASES = {
    "loha_dropouts": (
        tiny_llama,
        LoHaConfig(r=4, alpha=6, rank_dropout=0.3, module_dropout=0.3, target_modules=["q_proj", "v_proj", "up_proj"]),
    ),
    "lokr_dropouts": (
        tiny_llama,
        LoKrConfig(
            r=2,
            alpha=4,
            rank_dropout=0.3,
            rank_dropout_scale=True,
            module_dropout=0.2,
            target_modules=["q_proj", "down_proj"],
        ),
    ),
    "hira_dropout": (tiny_llama, HiraConfig(r=4, hira_dropout=0.3, target_modules=["q_proj", "v_proj"])),
    "delora_dropout": (
        tiny_llama,
        DeloraConfig(r=4, delora_lambda=5, module_dropout=0.3, target_modules=["q_proj", "o_proj"]),
    ),
    "boft_block_dropout": (
        tiny_llama,
        BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, boft_dropout=0.5, target_modules=["q_proj", "o_proj"]),
    ),
    "psoft_dropout": (tiny_llama, PsoftConfig(r=4, psoft_dropout=0.3, target_modules=["q_proj", "v_proj"])),
    "deft_dropout": (tiny_llama, DeftConfig(r=4, deft_dropout=0.3, target_modules=["q_proj", "v_proj"])),
    "pvera_sampling": (tiny_llama, PveraConfig(r=4, pvera_dropout=0.2, target_modules=["q_proj", "v_proj"])),
    "randlora_dropout": (tiny_llama, RandLoraConfig(r=8, randlora_dropout=0.3, target_modules=["q_proj"])),
    "miss_dropout": (tiny_llama, MissConfig(r=8, miss_dropout=0.3, target_modules=["q_proj", "v_proj"])),
    "gralora_dropout": (
        tiny_llama,
        GraloraConfig(r=4, gralora_k=2, hybrid_r=2, gralora_dropout=0.3, target_modules=["q_proj"]),
    ),
    "frod_dropout": (tiny_llama, FrodConfig(sparse_rate=0.05, frod_dropout=0.3, target_modules=["q_proj", "v_proj"])),
    "supra_dropout": (
        tiny_llama,
        SupertuningConfig(sparsity=0.95, r=2, lora_dropout=0.3, target_modules=["q_proj", "o_proj"]),
    ),
    "lora_dropout": (tiny_llama, LoraConfig(r=4, lora_dropout=0.3, target_modules=["q_proj", "v_proj"])),
    "dora_dropout": (tiny_llama, LoraConfig(r=4, lora_dropout=0.3, use_dora=True, target_modules=["q_proj", "o_proj"])),
    "tinylora_dropout": (
        tiny_llama,
        TinyLoraConfig(r=2, u=5, tinylora_dropout=0.3, target_modules=["q_proj", "o_proj"]),
    ),
}


def test_loaded_layers_take_the_model_s_mode(tmp_path):
    """A model in evaluation gets its new layers in evaluation too: no dropout, no sampling."""
    make_model, config = TRAINING_CASES["hira_dropout"]
    peft_model, fresh = save_with_nonzero_weights(make_model, config, tmp_path)
    ours = load_peft_adapter(fresh.eval(), tmp_path)
    assert not any(module.training for module in ours.modules())
    input_ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        assert torch.equal(ours(input_ids=input_ids).logits, ours(input_ids=input_ids).logits)


@pytest.mark.parametrize("case", list(TRAINING_CASES))
def test_training_mode_with_the_same_seed_gives_peft_s_logits(case, tmp_path):
    make_model, config = TRAINING_CASES[case]
    peft_model, fresh = save_with_nonzero_weights(make_model, config, tmp_path)
    ours = load_peft_adapter(fresh, tmp_path)
    peft_model.train(), ours.train()
    input_ids = torch.randint(0, 97, (2, 11))
    outputs = []
    with torch.no_grad():
        for seed in (0, 1):
            torch.manual_seed(seed)
            expected = peft_model(input_ids=input_ids).logits
            torch.manual_seed(seed)
            got = ours(input_ids=input_ids).logits
            relative = ((got - expected).norm() / expected.norm()).item()
            assert relative <= 1e-5, f"{case}, seed {seed}: relative error {relative:.2e}"
            outputs.append(got)
        evaluated = ours.eval()(input_ids=input_ids).logits
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[0], evaluated)  # random


def test_unsupported_types_and_fields_are_named(tmp_path):
    save_with_nonzero_weights(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "lora")
    config_path = tmp_path / "lora" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "peft_type": "XLORA"}))  # a PEFT type not loaded (yet)
    with pytest.raises(UnsupportedAdapter, match="peft_type 'XLORA' is not supported"):
        load_peft_adapter(tiny_llama(), tmp_path / "lora")

    config_path.write_text(json.dumps({**config, "bias": "all"}))
    with pytest.raises(UnsupportedAdapter, match="field 'bias' = 'all' is not supported"):
        load_peft_adapter(tiny_llama(), tmp_path / "lora")
    config_path.write_text(json.dumps({**config, "brand_new_option": 1}))
    with pytest.raises(UnsupportedAdapter, match="field 'brand_new_option' = 1 is not supported"):
        load_peft_adapter(tiny_llama(), tmp_path / "lora")


@pytest.mark.parametrize("case", ["lora", "rslora", "rank_and_alpha_pattern", "dora"])
def test_saved_adapters_load_into_peft_and_give_the_same_logits(case, tmp_path):
    """PEFT checkpoint → our layers → save_peft_adapter → PeftModel.from_pretrained: PEFT computes
    what it computed before the round trip (ranks, alphas, rsLoRA and DoRA's magnitudes kept)."""
    from peft import PeftModel

    make_model, config = CASES[case]
    peft_model, fresh = save_with_nonzero_weights(make_model, config, tmp_path / "from_peft")
    ours = load_peft_adapter(fresh, tmp_path / "from_peft")
    save_peft_adapter(ours, tmp_path / "ours")
    reloaded = PeftModel.from_pretrained(make_model(), tmp_path / "ours").eval()
    input_ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        expected, got = peft_model(input_ids=input_ids).logits, reloaded(input_ids=input_ids).logits
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-6
    assert load_peft_adapter(make_model(), tmp_path / "ours") is not None  # and back into ours


def test_save_refuses_what_peft_lora_cannot_hold(tmp_path):
    from reference_impls.lora import inject_lora, inject_vera

    with pytest.raises(UnsupportedAdapter, match="the model has none"):
        save_peft_adapter(tiny_llama(), tmp_path)
    model = tiny_llama()
    inject_lora(model, ["q_proj"], r=2)
    inject_vera(model, ["v_proj"], r=4)
    with pytest.raises(UnsupportedAdapter, match="VeRALinear"):
        save_peft_adapter(model, tmp_path)
    model = tiny_llama()
    inject_lora(model, ["q_proj"], r=2)
    inject_lora(model, ["v_proj"], r=2, use_rslora=True)
    with pytest.raises(UnsupportedAdapter, match="mix them"):
        save_peft_adapter(model, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_adalora_after_real_pruning_loads_with_peft_logits(tmp_path):
    """Train with PEFT's own rank allocator until it has pruned (update_and_allocate); the saved
    checkpoint then holds each layer's kept triplets only, some layers none at all. Loaded into ours
    it gives what PEFT, loading the same checkpoint, gives."""
    from peft import PeftModel

    config = AdaLoraConfig(
        init_r=4,
        target_r=1,
        lora_alpha=8,
        total_step=12,
        tinit=2,
        tfinal=4,
        deltaT=1,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_llama(), config)
    peft_model.train()
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    input_ids = torch.randint(0, 97, (4, 12))
    for step in range(config.total_step):
        peft_model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        peft_model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    kept = [sum(mask) for mask in saved["rank_pattern"].values()]
    assert 0 in kept and any(0 < k < 4 for k in kept), kept  # real pruning, down to rank 0 in places

    ours = load_peft_adapter(tiny_llama(), tmp_path)
    theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    test_ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        expected, got = theirs(input_ids=test_ids).logits, ours(input_ids=test_ids).logits
        untouched = tiny_llama()(input_ids=test_ids).logits
    assert (expected - untouched).abs().max() > 1e-2
    relative = ((got - expected).norm() / expected.norm()).item()
    assert relative <= 1e-5, f"relative error {relative:.2e}"


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda tensors: tensors.pop(next(k for k in sorted(tensors) if "layers.1" in k and "lora_B" in k)),
            "KeyError: 'lora_B'",
        ),
        (
            lambda tensors: tensors.update(
                {k: v[:, :-1].contiguous() for k, v in tensors.items() if "layers.1" in k and "lora_A" in k}
            ),
            "RuntimeError",
        ),
        (
            lambda tensors: tensors.update(
                {
                    "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
                    "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4),
                }
            ),
            "AttributeError",
        ),
    ],
    ids=["a tensor missing", "a tensor of the wrong shape", "a module the model lacks"],
)
def test_a_checkpoint_that_does_not_fit_leaves_the_model_unchanged(tmp_path, damage, message):
    from safetensors.torch import load_file, save_file

    save_with_nonzero_weights(tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    damage(tensors)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    model = tiny_llama()
    before = {name: type(module) for name, module in model.named_modules()}
    with pytest.raises(UnsupportedAdapter, match=f"does not fit this model at .*{message}.*left unchanged"):
        load_peft_adapter(model, tmp_path)
    assert {name: type(module) for name, module in model.named_modules()} == before
    assert all(parameter.requires_grad for parameter in model.parameters())


@pytest.mark.parametrize(
    "extra, named",
    [
        (
            {"lora_bias": True, "use_bdlora": {"nblocks": 2, "target_modules_bd_a": ["q_proj"]}},
            "use_bdlora and lora_bias",
        ),
        ({"use_dora": True, "kasa_config": {"beta": 0.1, "gamma": 0.1}}, "use_dora and kasa_config"),
        (
            {"init_lora_weights": "olora", "alora_invocation_tokens": [1]},
            "alora_invocation_tokens and init_lora_weights",
        ),
    ],
)
def test_lora_options_that_ours_does_not_combine_are_refused_by_name(extra, named, tmp_path):
    """Each LoRA variant is its own layer here: a checkpoint asking for two at once is refused, never loaded
    with one of them silently dropped."""
    save_with_nonzero_weights(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **extra}))
    with pytest.raises(UnsupportedAdapter, match=f"LoRA with {named}"):
        load_peft_adapter(tiny_llama(), tmp_path)
