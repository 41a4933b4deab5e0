"""Load adapters saved by HF PEFT (`save_pretrained`) into our reference modules.

    model = AutoModelForCausalLM.from_config(config)      # or any nn.Module with the same names
    load_peft_adapter(model, "path/to/adapter")            # adapter_config.json + adapter_model.safetensors
    model(...)                                             # computes what the PEFT model computes

PEFT saves one tensor per adapted module and name, under the module's path inside the PEFT wrapper
(`base_model.model.<path>.lora_A.weight`). We strip the wrapper's prefix, group the tensors by
module, wrap each module with the matching reference layer and copy the tensors in. Ranks are read
from the tensors' shapes, so `rank_pattern` needs no parsing; `alpha_pattern` is matched the way
PEFT matches it (the pattern must match the end of the module's path). Fields of the config that
would change what the model computes and that we do not implement raise `UnsupportedAdapter`,
naming the field.

Supported: LoRA (with `use_rslora`, `fan_in_fan_out`, `rank_pattern`, `alpha_pattern`, `lora_bias`,
the PiSSA, OLoRA, MiCA, EVA and LoftQ initialisations and KaSA: the residual, quantised or truncated
base of PiSSA, OLoRA, LoftQ and KaSA is rebuilt from the original weights, as PEFT rebuilds it;
CorDA and LoRA-GA once converted to plain LoRA; and Activated LoRA, `alora_invocation_tokens`,
returned as a wrapper that finds each input's invocation; and Block-diagonal LoRA, `use_bdlora`; and
VeLoRA, `velora_config`, whose compressed backward the loaded layers keep; and MonteCLoRA,
`monteclora_config`, with its variational parameters), DoRA (`use_dora`), VeRA, (IA)³, AdaLoRA, LoHa
and LoKr (on Linear, Conv1d and Conv2d layers, flattened or in CP form), HiRA, DeLoRA, OFT (with
COFT, block sharing and the Cayley–Neumann series), BOFT, HRA (with Gram–Schmidt), RoAd (its three
variants), OSF, PSOFT, DEFT (with PaRa), FRoD, FourierFT, WaveFT (db1, db2, sym2; with or without
the inverse transform), C3A, LN tuning, BEFT, SHiRA, Super-Tuning (with Supra), trainable tokens,
PVeRA, VB-LoRA (also its top-k form), RandLoRA, Uni-LoRA, TinyLoRA (with weight tying), MiSS (its
three variants), GraLoRA, PEANuT, Lily, GLoRA, AdaMSS and Poly (Polytropon and MHR: name each row's
task with `routing.use_tasks`), which are injected into the model in place; and prompt tuning,
P-tuning (served as prompt tuning: the checkpoint holds the encoder's output), multitask prompt
tuning (pass each row's `task_ids`), prefix tuning / P-tuning v2, cartridges (as prefixes: the
checkpoint holds the whole cache), CPT (its refined prompt, with its loss) and adaption prompts
(LLaMA-Adapter); and ShadowPEFT (`shadow`, "mirror" backbones of causal language models), returned
as a `shadow.ShadowPEFT` wrapper. Prompts and prefixes return a wrapper around the model (they
change its inputs), so always use the returned module. The training-time randomness of LoHa, LoKr,
HiRA, DeLoRA, BOFT, PSOFT, DEFT, FRoD, PVeRA, RandLoRA, TinyLoRA, Super-Tuning's Supra, MiSS,
GraLoRA and Poly is loaded too: in training mode, with the same seed, the loaded model draws the
same masks and samples as PEFT's, and LoRA's and DoRA's `lora_dropout` drops as PEFT's does.

The other way, `save_peft_adapter(model, adapter_dir)` writes the LoRA or DoRA layers of a model
(ours, injected into nn.Linear layers) as PEFT saves them, so that `PeftModel.from_pretrained`
loads them onto the same base model: every adapted layer by its full path, each layer's rank and
α in rank_pattern/alpha_pattern where they differ from the most common ones.
"""

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from reference_impls._plumbing import freeze_model, replace_module
from reference_impls.context_prompts import CPT
from reference_impls.ia3 import IA3Linear
from reference_impls.interop_layers import (
    UnsupportedAdapter,
    adalora_layer,
    adamss_layer,
    adaption_prompt_layer,
    beft_layer,
    boft_layer,
    c3a_layer,
    deft_layer,
    delora_layer,
    fourierft_layer,
    frod_layer,
    glora_layer,
    gralora_layer,
    hira_layer,
    hra_layer,
    ia3_layer,
    lily_layer,
    ln_tuning_layer,
    loha_layer,
    lokr_layer,
    lora_layer,
    miss_layer,
    oft_layer,
    osf_layer,
    peanut_layer,
    poly_layer,
    psoft_layer,
    pvera_layer,
    randlora_layer,
    road_layer,
    shadow_model,
    shira_layer,
    supertuning_layer,
    tinylora_layers,
    trainable_tokens_layer,
    unilora_layers,
    vblora_layer,
    vera_layer,
    waveft_layer,
)
from reference_impls.lora import DoRALinear, LoRALinear, SVDLinear, VeRALinear
from reference_impls.lora_serving import ActivatedLoRA
from reference_impls.prefixes import PrefixTuning
from reference_impls.prompts import MultitaskPromptTuning, PromptTuning

FAMILY = "Interoperability with PEFT"

# Not a paper's method: the bridge to the library that practitioners run.
IMPLEMENTS = ()
# The library whose checkpoints it reads and writes.
COVERED_BY = ("hf-peft",)

WRAPPER_PREFIX = "base_model.model."
# "<module path>.<method>_<name>[.<part>][.weight]", e.g. "layers.0.q_proj.lora_A.weight" or
# "layers.0.q_proj.osf_svd_params.U_low"; the tensor's name is what follows the module's path.
METHOD_PREFIXES = (
    "lora vera ia3 hada lokr hira delora oft boft hra road osf psoft deft frod fourierft waveft c3a ln_tuning beft "
    "shira supertuning trainable pvera adamss poly vblora randlora unilora tinylora miss gralora peanut lily glora"
).split()
PREFIXES = "|".join(METHOD_PREFIXES)
TENSOR_NAME = rf"(.+?)\.((?:{PREFIXES})_[A-Za-z0-9_]+?(?:\.[A-Za-z0-9_]+)??)(?:\.weight)?"


# Fields we read, or whose value cannot change what the loaded model computes: bookkeeping,
# training-time settings, and settings whose effect is already in the saved tensors (targets,
# ranks, initialisation). Any other field is accepted only at a neutral value (None, False, 0,
# empty, "none"), so a PEFT feature we do not implement fails loudly instead of silently.
HANDLED = {
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "init_lora_weights",
    "eva_config",  # EVA's, CorDA's and LoRA-GA's settings shape the start only (and the last two
    "corda_config",  # are refused by init_lora_weights unless the checkpoint was converted to LoRA)
    "lora_ga_config",
    "loftq_config",  # read by the LoftQ rebuild of the quantised base
    "cpt_token_ids",  # CPT's context and its loss settings, read by the CPT wrapper
    "cpt_mask",
    "cpt_tokens_type_mask",
    "opt_weighted_loss_type",
    "opt_loss_decay_factor",
    "opt_projection_epsilon",
    "opt_projection_format_epsilon",
    "velora_config",  # read by the VeLoRA layers (training only)
    "monteclora_config",  # read by the MonteCLoRA layers (training only)
    "init_weights",
    "init_ia3_weights",
    "r",
    "lora_alpha",
    "alpha_pattern",
    "rank_pattern",
    "use_rslora",
    "use_dora",
    "lora_bias",
    "kasa_config",
    "alora_invocation_tokens",
    "use_bdlora",
    "fan_in_fan_out",
    "feedforward_modules",
    "lora_dropout",
    "hira_dropout",
    "rank_dropout",
    "rank_dropout_scale",
    "module_dropout",
    "alpha",
    "use_effective_conv2d",
    "decompose_both",
    "decompose_factor",
    "delora_lambda",
    "lambda_pattern",
    "vera_dropout",
    "d_initial",
    "projection_prng_key",
    "save_projection",
    "megatron_core",
    "qalora_group_size",
    "target_r",
    "init_r",
    "tinit",
    "tfinal",
    "deltaT",
    "beta1",
    "beta2",
    "orth_reg_weight",
    "total_step",
    "num_virtual_tokens",
    "token_dim",
    "num_transformer_submodules",
    "num_attention_heads",
    "num_layers",
    "prompt_tuning_init",
    "prompt_tuning_init_text",
    "tokenizer_name_or_path",
    "tokenizer_kwargs",
    "encoder_hidden_size",
    "prefix_projection",
    "encoder_reparameterization_type",
    "num_tasks",
    "num_ranks",
    "prompt_tuning_init_task",
    "prompt_tuning_init_state_dict_path",
    "num_frozen_tokens",
    "encoder_num_layers",
    "encoder_dropout",
    "adapter_len",
    "oft_block_size",
    "block_share",
    "coft",
    "eps",
    "use_cayley_neumann",
    "num_cayley_neumann_terms",
    "boft_block_size",
    "boft_block_num",
    "boft_n_butterfly_factor",
    "boft_dropout",
    "apply_GS",
    "variant",
    "group_size",
    "effective_rank",
    "psoft_alpha",
    "psoft_dropout",
    "psoft_svd",
    "psoft_svd_lowrank_niter",
    "random_seed",
    "ab_svd_init",
    "psoft_orth",
    "psoft_mag_a",
    "psoft_mag_b",
    "cayley_neumann_eps",
    "decomposition_method",
    "init_scale",
    "para",
    "deft_dropout",
    "sparse_rate",
    "regularization_alpha",
    "runtime_offload_base_weight",
    "frod_dropout",
    "progressbar",
    "n_frequency",
    "n_frequency_pattern",
    "scaling",
    "random_loc_seed",
    "wavelet_family",
    "use_idwt",
    "proportional_parameters",
    "block_size",
    "block_size_pattern",
    "mask_type",
    "token_indices",
    "sample_at_inference",
    "pvera_dropout",
    "topk",
    "num_vectors",
    "vector_length",
    "init_logits_std",
    "init_vector_bank_bound",
    "save_only_topk_weights",
    "vblora_dropout",
    "randlora_alpha",
    "randlora_dropout",
    "sparse",
    "very_sparse",
    "theta_d_length",
    "proj_seed",
    "init_theta_d_bound",
    "save_indices",
    "unilora_dropout",
    "u",
    "weight_tying",
    "projection_seed",
    "init_v_bound",
    "tinylora_dropout",
    "sparsity",
    "select_top",
    "save_precomputed_indices",
    "num_subspaces",
    "subspace_rank",
    "use_dynamic_rank",
    "svd_threshold",
    "use_asa",
    "asa_target_subspaces",
    "init_warmup",
    "final_warmup",
    "mask_interval",
    "asa_importance_beta",
    "asa_uncertainty_beta",
    "asa_schedule_exponent",
    "poly_type",
    "n_tasks",
    "n_skills",
    "n_splits",
    "mini_r",
    "miss_dropout",
    "gralora_k",
    "hybrid_r",
    "gralora_dropout",
    "depth",
    "act_fn",
    "stride_A",
    "num_B",
    "config_A_B",
    "config_C",
    "config_D_E",
    "adapter_layers",
}


def _neutral(value) -> bool:
    return value is None or value is False or value == 0 or value in ("none", "") or value == [] or value == {}


SUPPORTED_TYPES = (
    "LORA",
    "SHADOW",
    "VERA",
    "IA3",
    "ADALORA",
    "LOHA",
    "LOKR",
    "HIRA",
    "DELORA",
    "OFT",
    "BOFT",
    "HRA",
    "ROAD",
    "OSF",
    "PSOFT",
    "DEFT",
    "FROD",
    "FOURIERFT",
    "WAVEFT",
    "C3A",
    "LN_TUNING",
    "BEFT",
    "SHIRA",
    "SUPERTUNING",
    "TRAINABLE_TOKENS",
    "PVERA",
    "VBLORA",
    "RANDLORA",
    "UNILORA",
    "TINYLORA",
    "MISS",
    "GRALORA",
    "PEANUT",
    "LILY",
    "GLORA",
    "ADAMSS",
    "POLY",
    "PROMPT_TUNING",
    "CPT",
    "P_TUNING",
    "MULTITASK_PROMPT_TUNING",
    "PREFIX_TUNING",
    "CARTRIDGE",
    "ADAPTION_PROMPT",
)


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Load a PEFT checkpoint into `model` (or, for prompts, a wrapper around it: use what it returns).
    Every layer is built and filled before the first one is swapped in, so a checkpoint that does not
    fit raises UnsupportedAdapter and leaves the model as it was."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    peft_type = config.get("peft_type")
    if peft_type == "XLORA":  # PEFT 0.21's save drops every key holding ".0.", the classifier's first layer too
        raise UnsupportedAdapter(
            "peft_type 'XLORA' is not supported: PEFT 0.21's X-LoRA checkpoints lack the classifier's first layer; "
            "load each expert LoRA and build reference_impls.expert_mixing.XLoRA from them"
        )
    if peft_type == "SHADOW":  # a model-level side network: its own fields, its own keys
        return shadow_model(model, config, load_file(str(adapter_dir / "adapter_model.safetensors")))
    if peft_type not in SUPPORTED_TYPES:
        raise UnsupportedAdapter(f"peft_type {peft_type!r} is not supported (supported: {', '.join(SUPPORTED_TYPES)})")
    for field, value in config.items():
        if field not in HANDLED and not _neutral(value):
            raise UnsupportedAdapter(f"adapter_config.json field {field!r} = {value!r} is not supported")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    if peft_type in ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "PREFIX_TUNING", "CARTRIDGE", "CPT"):
        return _load_prompt(model, config, tensors)
    if peft_type == "ADAPTION_PROMPT":
        prompts = {
            key.removeprefix(WRAPPER_PREFIX).removesuffix(".adaption_prompt"): {"key": key}
            for key in tensors
            if key.endswith(".adaption_prompt")
        }
        planned = _plan(prompts, lambda path, found: adaption_prompt_layer(model, path, found["key"], tensors))
    else:
        # Tensors saved once for the whole model (VeRA's projections, FRoD's bases, Uni-LoRA's θ_d, TinyLoRA's
        # vectors), not per module; RandLoRA's bases are saved with every layer too, and the layers' copies are
        # the ones used.
        owners = ("vera", "frod", "pvera", "vblora", "randlora", "unilora", "tinylora")
        shared_prefixes = tuple(f"base_model.{m}_" for m in owners)
        shared_keys = [k for k in tensors if k.startswith(shared_prefixes)]
        shared = {key: tensors.pop(key) for key in shared_keys}
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            path = key.removeprefix(WRAPPER_PREFIX)
            match = re.fullmatch(TENSOR_NAME, path)
            if not match:
                raise UnsupportedAdapter(f"unexpected tensor {key!r} in adapter_model.safetensors")
            by_module.setdefault(match.group(1), {})[match.group(2)] = tensor
        if peft_type == "VERA":
            build = vera_layer(config, shared, first=next(iter(by_module), None))
        elif peft_type == "FROD":
            build = frod_layer(shared)
        elif peft_type == "PVERA":
            build = pvera_layer(config, shared)
        elif peft_type == "VBLORA":
            build = vblora_layer(config, shared)
        elif peft_type in ("UNILORA", "TINYLORA"):
            build = None  # all layers at once, below
        else:
            build = {
                "LORA": lora_layer,
                "IA3": ia3_layer,
                "ADALORA": adalora_layer,
                "LOHA": loha_layer,
                "LOKR": lokr_layer,
                "HIRA": hira_layer,
                "DELORA": delora_layer,
                "OFT": oft_layer,
                "BOFT": boft_layer,
                "HRA": hra_layer,
                "ROAD": road_layer,
                "OSF": osf_layer,
                "PSOFT": psoft_layer,
                "DEFT": deft_layer,
                "FOURIERFT": fourierft_layer,
                "WAVEFT": waveft_layer,
                "C3A": c3a_layer,
                "LN_TUNING": ln_tuning_layer,
                "BEFT": beft_layer,
                "SHIRA": shira_layer,
                "SUPERTUNING": supertuning_layer,
                "TRAINABLE_TOKENS": trainable_tokens_layer,
                "RANDLORA": randlora_layer,
                "MISS": miss_layer,
                "GRALORA": gralora_layer,
                "PEANUT": peanut_layer,
                "LILY": lily_layer,
                "GLORA": glora_layer,
                "ADAMSS": adamss_layer,
                "POLY": poly_layer,
            }[peft_type]
        if peft_type in ("UNILORA", "TINYLORA"):  # vectors shared across layers, seeds that follow layer order
            layers = unilora_layers if peft_type == "UNILORA" else tinylora_layers
            planned = _plan({"every adapted layer": None}, lambda *_: layers(model, config, shared, by_module))
            planned = planned["every adapted layer"]
        else:
            planned = _plan(by_module, lambda path, found: build(model, config, path, found))
    for path, layer in planned.items():  # only now, with every layer built, is the model changed
        layer.train(model.get_submodule(path).training)  # a new module is in training mode: take the model's
        replace_module(model, path, layer)
    freeze_model(model)
    if config.get("alora_invocation_tokens"):  # the layers act from each input's invocation on: find it
        return ActivatedLoRA(model, config["alora_invocation_tokens"])
    return model


def _plan(by_module: dict, build) -> dict[str, nn.Module]:
    """Each adapted module's new layer, built and filled, the model untouched; any mismatch between
    checkpoint and model (a module it lacks, a tensor missing or of the wrong shape) is named."""
    planned = {}
    with torch.no_grad():
        for path, found in by_module.items():
            try:
                planned[path] = build(path, found)
            except UnsupportedAdapter:
                raise
            except (AttributeError, KeyError, RuntimeError, ValueError, IndexError) as error:
                raise UnsupportedAdapter(
                    f"the checkpoint does not fit this model at {path!r}: {type(error).__name__}: {error}; "
                    f"the model was left unchanged"
                ) from None
    return planned


def _load_prompt(model, config, tensors):
    """Prompt tuning, P-tuning, CPT and prefix tuning save the final vectors (a prompt or prefix after its
    encoder or MLP, CPT's E₀ + Δ) as one tensor: a P-tuning checkpoint is served as prompt tuning."""
    if config.get("num_transformer_submodules", 1) != 1:
        raise UnsupportedAdapter(
            f"num_transformer_submodules = {config['num_transformer_submodules']} "
            f"(encoder-decoder models) is not supported"
        )
    if config.get("task_type") not in ("CAUSAL_LM", None):
        raise UnsupportedAdapter(f"task_type {config['task_type']!r} is not supported for prompts (only CAUSAL_LM)")
    wanted = ["prompt_embeddings"] + (
        ["prefix_task_cols", "prefix_task_rows"] if "MULTITASK" in config["peft_type"] else []
    )
    missing = [name for name in wanted if name not in tensors]
    if missing:
        raise UnsupportedAdapter(f"adapter_model.safetensors lacks {', '.join(missing)}: not a complete checkpoint")
    prompt = tensors["prompt_embeddings"]
    n = config["num_virtual_tokens"]
    with torch.no_grad():
        if config["peft_type"] == "MULTITASK_PROMPT_TUNING":  # P*, and every task's U_k, V_k
            U, V = tensors["prefix_task_cols"], tensors["prefix_task_rows"]
            wrapper = MultitaskPromptTuning(model, n=n, tasks=U.shape[0], r=U.shape[2])
            for name, value in (("prompt", prompt), ("U", U), ("V", V)):
                if getattr(wrapper, name).shape != value.shape:
                    raise UnsupportedAdapter(f"{name} of shape {tuple(value.shape)} does not fit this model")
                getattr(wrapper, name).copy_(value)
        elif config["peft_type"] == "CPT":  # as PEFT loads it: E₀ the saved prompt, Δ = 0; its loss settings kept
            decay = config.get("opt_loss_decay_factor") if config.get("opt_weighted_loss_type") == "decay" else None
            wrapper = CPT(
                model,
                config["cpt_token_ids"],
                config["cpt_tokens_type_mask"],
                epsilon=config.get("opt_projection_epsilon", 0.1),
                format_epsilon=config.get("opt_projection_format_epsilon", 0.1),
                decay=decay,
            )
            if wrapper.prompt.E0.shape != prompt.shape:
                raise UnsupportedAdapter(f"CPT prompt of shape {tuple(prompt.shape)} does not fit this model")
            wrapper.prompt.E0.copy_(prompt)
        elif config["peft_type"] in ("PROMPT_TUNING", "P_TUNING"):
            wrapper = PromptTuning(model, n=n)
            wrapper.prompt.copy_(prompt)
        else:
            wrapper = PrefixTuning(model, n=n, hidden=None)
            if wrapper.prefix_input.shape != prompt.shape:
                raise UnsupportedAdapter(
                    f"prefix of shape {tuple(prompt.shape)} does not fit this model "
                    f"(expected {tuple(wrapper.prefix_input.shape)})"
                )
            wrapper.prefix_input.copy_(prompt)
    freeze_model(wrapper)
    return wrapper


def save_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> None:
    """Write the model's LoRALinear (or DoRALinear) layers as a PEFT LoRA checkpoint."""
    layers = {path: module for path, module in model.named_modules() if isinstance(module, LoRALinear)}  # DoRA too
    others = [
        (path, type(module).__name__)
        for path, module in model.named_modules()
        if isinstance(module, (VeRALinear, SVDLinear, IA3Linear))
    ]
    if not layers or others:
        raise UnsupportedAdapter(
            "save_peft_adapter writes LoRA and DoRA layers only; "
            + ("found {!r} ({})".format(*others[0]) if others else "the model has none")
        )
    dora = {type(layer) is DoRALinear for layer in layers.values()}
    rslora = {layer.scale != layer.alpha / layer.r for layer in layers.values()}  # α/√r rather than α/r
    biases = {layer.B_bias is not None for layer in layers.values()}
    dropouts = {getattr(layer.dropout, "p", 0.0) for layer in layers.values()}
    if len(dora) > 1 or len(rslora) > 1 or len(biases) > 1 or len(dropouts) > 1:
        raise UnsupportedAdapter(
            "PEFT keeps use_dora, use_rslora, lora_bias and lora_dropout for the whole adapter: the layers mix them"
        )
    r = Counter(layer.r for layer in layers.values()).most_common(1)[0][0]
    alpha = Counter(layer.alpha for layer in layers.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(layers),
        "use_dora": dora.pop(),
        "use_rslora": rslora.pop(),
        "lora_dropout": dropouts.pop(),
        "lora_bias": biases.pop(),
        "bias": "none",
        "fan_in_fan_out": False,
        # PEFT matches a pattern against the end of a module's path: the full path, escaped, is exact.
        "rank_pattern": {re.escape(path): layer.r for path, layer in layers.items() if layer.r != r},
        "alpha_pattern": {re.escape(path): layer.alpha for path, layer in layers.items() if layer.alpha != alpha},
    }
    tensors = {}
    for path, layer in layers.items():
        key = WRAPPER_PREFIX + path
        tensors[f"{key}.lora_A.weight"] = layer.A.detach().contiguous()
        tensors[f"{key}.lora_B.weight"] = layer.B.detach().contiguous()
        if layer.B_bias is not None:
            tensors[f"{key}.lora_B.bias"] = layer.B_bias.detach().contiguous()
        if isinstance(layer, DoRALinear):
            tensors[f"{key}.lora_magnitude_vector"] = layer.m.detach().contiguous()
    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(adapter_dir / "adapter_model.safetensors"))
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
