"""Our layers from PEFT's tensors: one builder per PEFT layer type, used by `interop.load_peft_adapter`.

Each builder takes the model, the adapter's config, the adapted module's path and the tensors saved
for it (by their PEFT names without the adapter name: `lora_A`, `hada_w1_a`, ...), and returns our
layer around the model's module, filled; it changes nothing in the model. Ranks are read from the
tensors' shapes where they show them, so `rank_pattern` needs no parsing; `alpha_pattern` is matched
the way PEFT matches it (the pattern must match the end of the module's path).
"""

import copy
import re

import torch
from torch import nn

from reference_impls._plumbing import freeze_model
from reference_impls.adamss import AdaMSSLinear
from reference_impls.delora import DeLoRALinear
from reference_impls.frod import FRoDLinear, layer_role
from reference_impls.glora import GLoRALinear
from reference_impls.ia3 import IA3Linear
from reference_impls.lily import LilyDown, LilyExperts, LilyLinear
from reference_impls.lora import DoRALinear, LoRALinear, SVDLinear, VeRALinear, VeRAShared
from reference_impls.lora_bayesian import MonteCLoRALinear
from reference_impls.lora_inits import INITIALISATIONS, KaSALinear
from reference_impls.lora_quant import loftq_init
from reference_impls.lora_serving import ActivatedLoRALinear, BlockDiagonalLoRALinear
from reference_impls.low_memory import VeLoRALinear
from reference_impls.orthogonal import BOFTLinear, HRALinear, OFTLinear
from reference_impls.prefixes import AdaptedAttention
from reference_impls.products import HiRALayer, LoHaLayer, LoKrLayer
from reference_impls.projections import SharedVector, TinyLoRALinear, UniLoRALinear, assign, tinylora_groups
from reference_impls.road import RoAdLinear
from reference_impls.routing import PolyLoRALinear
from reference_impls.selective import BiasTunedLinear, SHiRALinear, TrainableTokens, TunedNorm, is_norm, tied_to
from reference_impls.shadow import ShadowBlock, ShadowPEFT
from reference_impls.shared_bases import (
    PVeRALinear,
    PVeRAShared,
    RandLoRABases,
    RandLoRALinear,
    VBLoRALinear,
    VectorBank,
)
from reference_impls.sparse import SuperTuningLinear
from reference_impls.spectral import C3ALinear, FourierFTLinear, WaveFTLinear
from reference_impls.structured import ACTIVATIONS, GraLoRALinear, MiSSLinear, PEANuTLinear
from reference_impls.subspace import DEFTLinear, OSFLinear, PSOFTLinear

FAMILY = "Interoperability with PEFT"

# Not a paper's method: the bridge to the library that practitioners run.
IMPLEMENTS = ()
COVERED_BY = ("hf-peft",)


class UnsupportedAdapter(ValueError):
    pass


def base_linear(model: nn.Module, path: str, fan_in_fan_out: bool) -> nn.Linear:
    """The module at path as an nn.Linear. GPT-2's Conv1D (fan_in_fan_out) stores Wᵀ: a transposed copy."""
    module = model.get_submodule(path)
    if isinstance(module, nn.Linear):
        return module
    if type(module).__name__ == "Conv1D" and fan_in_fan_out:
        d_in, d_out = module.weight.shape
        linear = nn.Linear(
            d_in, d_out, bias=module.bias is not None, device=module.weight.device, dtype=module.weight.dtype
        )
        linear.weight.copy_(module.weight.T)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
        return linear
    raise UnsupportedAdapter(
        f"module {path!r} is a {type(module).__name__}; only nn.Linear (and GPT-2's Conv1D "
        f"with fan_in_fan_out) are supported; the model was left unchanged"
    )


def pattern_value(patterns: dict, path: str, default):
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


# LoRA initialisations that leave the base weight as it was: the saved A and B are all there is.
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva", "mica")


def base_rebuilders(config) -> dict:
    """The initialisations that leave a residual or quantised base, which PEFT runs again on the
    original weight when it loads their checkpoint (the saved A and B then replace the factors)."""
    loftq = config.get("loftq_config") or {}
    bits, iterations = loftq.get("loftq_bits", 4), loftq.get("loftq_iter", 1)
    return {**INITIALISATIONS, "loftq": lambda layer: loftq_init(layer, bits, iterations, scaled=False)}


def lora_layer(model, config, path, found):
    init = config.get("init_lora_weights", True)
    fan_in_fan_out = config.get("fan_in_fan_out", False)
    rebuilders = base_rebuilders(config)
    if init not in PLAIN_INITS and init not in rebuilders:
        raise UnsupportedAdapter(
            f"LoRA init_lora_weights = {init!r} is not supported: it changes the base weight in a way the "
            f"checkpoint does not hold (supported: {', '.join(map(repr, PLAIN_INITS + tuple(rebuilders)))}; "
            "a CorDA, LoRA-GA or PiSSA adapter saved with path_initial_model_for_weight_conversion is plain LoRA)"
        )
    # One option at a time, as ours implements them; DoRA may start from PiSSA or OLoRA.
    features = [
        f
        for f in (
            "use_dora",
            "use_bdlora",
            "alora_invocation_tokens",
            "kasa_config",
            "velora_config",
            "monteclora_config",
            "lora_bias",
        )
        if config.get(f)
    ]
    features += [f"init_lora_weights = {init!r}"] if init in rebuilders else []
    if len(features) > 1 and not (features[0] == "use_dora" and len(features) == 2 and init in INITIALISATIONS):
        raise UnsupportedAdapter(f"LoRA with {' and '.join(features)} together is not supported")
    kasa = "kasa_config" in features
    if fan_in_fan_out and (init in ("olora", "loftq") or kasa):  # they factor or quantise the stored Wᵀ
        raise UnsupportedAdapter(f"LoRA {'kasa_config' if kasa else init} with fan_in_fan_out is not supported")
    base = base_linear(model, path, fan_in_fan_out)
    if init in rebuilders or kasa:  # the base weight is rebuilt: work on a copy, the model stays as it is
        base = copy.deepcopy(base)
    r = found["lora_A"].shape[0]
    alpha = pattern_value(config.get("alpha_pattern"), path, config["lora_alpha"])
    options = {"r": r, "alpha": alpha, "use_rslora": config.get("use_rslora", False)}
    options["dropout"] = config.get("lora_dropout", 0.0)  # in training, as PEFT drops
    if config.get("use_dora"):
        layer = DoRALinear(base, **options)
        layer.m.copy_(found["lora_magnitude_vector"].flatten())
    elif config.get("use_bdlora"):  # one factor block-diagonal, chosen by PEFT's patterns on the module's path
        bd = config["use_bdlora"]
        on_a = any(pattern in path for pattern in bd.get("target_modules_bd_a") or [])
        on_b = any(pattern in path for pattern in bd.get("target_modules_bd_b") or [])
        if on_a == on_b:  # neither (a plain LoRA layer, match_strict=False) or both (PEFT refuses)
            raise UnsupportedAdapter(f"use_bdlora at {path!r}: {'both' if on_a else 'neither'} block patterns match")
        layer = BlockDiagonalLoRALinear(base, **options, blocks=bd["nblocks"], diagonal="A" if on_a else "B")
    elif config.get("alora_invocation_tokens"):  # Activated LoRA: the update from the invocation onwards
        layer = ActivatedLoRALinear(base, **options)
    elif config.get("velora_config"):  # VeLoRA: LoRA's forward; its projection vector, for more training
        velora = config["velora_config"]
        layer = VeLoRALinear(
            base,
            **options,
            groups=velora.get("num_groups", 64),
            rebuild_scale=velora.get("scale", 1.0),
            init=velora.get("init_type") or "batch_average",  # not `init`: that name is init_lora_weights here
        )
        layer.v.copy_(found["lora_velora_embed"])  # PEFT recomputes it at the next training step unless "random"
    elif config.get("monteclora_config"):  # MonteCLoRA: LoRA at evaluation; its variational parameters too
        monte = config["monteclora_config"]
        layer = MonteCLoRALinear(
            base,
            **options,
            samples=monte.get("num_samples", 8),
            dirichlet_prior=monte.get("dirichlet_prior", 0.1),
            sample_scale=monte.get("sample_scaler", 1e-4),
            kl_weight=monte.get("kl_loss_weight", 1e-5),
            entropy=monte.get("use_entropy", False),
            buffer_size=monte.get("buffer_size", 150),
        )
        prefix = "lora_monteclora_sampler."
        for ours, theirs in (("log_std", "std_prior"), ("log_concentration", "expert_weights_prior"),
                             ("variance", "gaussian_var_prior"), ("mixture", "expert_weights")):  # fmt: skip
            getattr(layer, ours).copy_(found[prefix + theirs])
    elif kasa:  # as PEFT loads KaSA: the truncation again, on the original W; then the saved factors
        layer = KaSALinear(base, **options)
        layer.diag.copy_(found["lora_diag"])
    else:
        layer = LoRALinear(base, **options, bias=config.get("lora_bias", False))
        if layer.B_bias is not None:
            layer.B_bias.copy_(found["lora_B.bias"])
    if init in rebuilders:  # as PEFT loads PiSSA, OLoRA and LoftQ: the initialisation again, on the original W
        rebuilders[init](layer)
    layer.A.copy_(found["lora_A"])
    layer.B.copy_(found["lora_B"])
    return layer


def vera_layer(config, shared, first):
    if "base_model.vera_A" not in shared:
        raise UnsupportedAdapter("VeRA adapter saved with save_projection=False: the projections are not in the file")
    projections = VeRAShared(config["r"], 1, 1)
    projections.A, projections.B = shared["base_model.vera_A"], shared["base_model.vera_B"]

    def build(model, config, path, found):
        base = base_linear(model, path, config.get("fan_in_fan_out", False))
        layer = VeRALinear(base, projections, owns_shared=path == first)
        layer.lambda_b.copy_(found["vera_lambda_b"])
        layer.lambda_d.copy_(found["vera_lambda_d"])
        return layer

    return build


def ia3_layer(model, config, path, found):
    base = base_linear(model, path, config.get("fan_in_fan_out", False))
    feedforward = config.get("feedforward_modules") or []
    # As PEFT decides: a string is a regex over the whole path, a list names path endings.
    if isinstance(feedforward, str):
        scale_input = re.fullmatch(feedforward, path) is not None
    else:
        scale_input = any(path == name or path.endswith("." + name) for name in feedforward)
    layer = IA3Linear(base, scale_input=scale_input)
    layer.l.copy_(found["ia3_l"].flatten())
    return layer


def adalora_layer(model, config, path, found):
    # After pruning (rank_pattern in the config), PEFT saves each layer's kept triplets only; the
    # scale stays α / init_r (PEFT's ranknum), α being the layer's kept rank when lora_alpha is 0.
    base = base_linear(model, path, config.get("fan_in_fan_out", False))
    r = found["lora_A"].shape[0]
    alpha = config["lora_alpha"] if config.get("lora_alpha", 0) > 0 else r
    layer = SVDLinear(base, r=r, alpha=alpha, initial_r=config.get("init_r") or r)
    layer.Q.copy_(found["lora_A"])
    layer.P.copy_(found["lora_B"])
    layer.lambda_.copy_(found["lora_E"])
    return layer


def base_layer(model, path, config) -> nn.Module:
    """An nn.Linear (or GPT-2's Conv1D, as one), or a convolution, for the methods that adapt both."""
    module = model.get_submodule(path)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module
    return base_linear(model, path, config.get("fan_in_fan_out", False))


def fill(layer: nn.Module, values: dict[str, torch.Tensor]) -> nn.Module:
    """Copy each tensor into the layer's parameter of that name, shapes equal (copy_ would broadcast).
    A Conv1d core saved with a trailing kernel axis of 1 (PEFT keeps the Conv2d shape) loses it."""
    for name, value in values.items():
        target = layer.get_parameter(name) if "." in name else getattr(layer, name)
        if value.dim() == target.dim() + 1 and value.shape[-1] == 1:
            value = value.squeeze(-1)
        if value.shape != target.shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)} in the checkpoint, {tuple(target.shape)} here")
        target.copy_(value)
    return layer


def loha_layer(model, config, path, found):
    # PEFT keeps B₁, B₂ as (r × d_out) in the CP form and as (d_out × r) otherwise.
    effective = "hada_t1" in found
    alpha = pattern_value(config.get("alpha_pattern"), path, config["alpha"])
    r = found["hada_w1_b"].shape[0]
    dropouts = {"rank_dropout": config.get("rank_dropout", 0.0), "module_dropout": config.get("module_dropout", 0.0)}
    layer = LoHaLayer(base_layer(model, path, config), r=r, alpha=alpha, effective_conv=effective, **dropouts)
    if layer.effective_conv != effective:
        raise UnsupportedAdapter(f"LoHa at {path!r}: the checkpoint's CP form does not fit this layer")
    B1, B2 = (found["hada_w1_a"].T, found["hada_w2_a"].T) if effective else (found["hada_w1_a"], found["hada_w2_a"])
    values = {"B1": B1, "A1": found["hada_w1_b"], "B2": B2, "A2": found["hada_w2_b"]}
    if effective:
        values |= {"T1": found["hada_t1"], "T2": found["hada_t2"]}
    return fill(layer, values)


def lokr_layer(model, config, path, found):
    base = base_layer(model, path, config)
    r = pattern_value(config.get("rank_pattern"), path, config["r"])
    alpha = pattern_value(config.get("alpha_pattern"), path, config["alpha"])
    layer = LoKrLayer(
        base,
        r=r,
        alpha=alpha,
        factor=config.get("decompose_factor", -1),
        decompose_both=config.get("decompose_both", False),
        effective_conv=config.get("use_effective_conv2d", False),
        rank_dropout=config.get("rank_dropout", 0.0),
        rank_dropout_scale=config.get("rank_dropout_scale", False),
        module_dropout=config.get("module_dropout", 0.0),
    )
    if isinstance(base, nn.Conv1d) and layer.full_W2:
        # torch.kron of C (2-D) with a 3-D W₂ pairs C's axes with W₂'s last two, not with its channel
        # axes: PEFT's Conv1d update is then not C ⊗ W₂ over the channels, and we do not copy it.
        raise UnsupportedAdapter(f"LoKr at {path!r}: a Conv1d with a full W2 (PEFT's layout is not C ⊗ W2)")
    names = {"lokr_w1": "C", "lokr_w1_a": "C_B", "lokr_w1_b": "C_A", "lokr_w2": "W2", "lokr_t2": "T"}
    names |= {"lokr_w2_a": "B", "lokr_w2_b": "A"}
    expected = {name for name, ours in names.items() if hasattr(layer, ours)}
    if set(found) != expected:
        raise UnsupportedAdapter(
            f"LoKr at {path!r}: the checkpoint holds {sorted(found)}, the config's r, decompose_both, "
            f"decompose_factor and use_effective_conv2d give {sorted(expected)}"
        )
    values = {names[name]: tensor for name, tensor in found.items()}
    if layer.effective_conv:
        values["B"] = found["lokr_w2_a"].T  # (r × b) in PEFT's CP form
    return fill(layer, values)


def hira_layer(model, config, path, found):
    base = base_linear(model, path, config.get("fan_in_fan_out", False))
    layer = HiRALayer(base, r=found["hira_A"].shape[0], dropout=config.get("hira_dropout", 0.0))
    return fill(layer, {"A": found["hira_A"], "B": found["hira_B"]})


def delora_layer(model, config, path, found):
    # PEFT's `module_dropout` for DeLoRA is a dropout of the update's input.
    r, dropout = found["delora_A"].shape[0], config.get("module_dropout", 0.0)
    layer = DeLoRALinear(base_linear(model, path, False), r=r, dropout=dropout)
    values = {"A": found["delora_A"], "B": found["delora_B"], "lambda_": found["delora_lambda"]}
    layer.w.copy_(found["delora_w_norm"])  # the norms of the weight PEFT's layer was made on
    return fill(layer, values)


def oft_layer(model, config, path, found):
    # Q is saved as each block's b(b−1)/2 upper entries; PEFT's Cayley–Neumann series is that of our
    # R with −Q (reference_impls.orthogonal explains), so a Neumann checkpoint's Q changes sign.
    upper = found["oft_R"]
    b = round((1 + (1 + 8 * upper.shape[1]) ** 0.5) / 2)
    base = base_linear(model, path, config.get("fan_in_fan_out", False))
    neumann = neumann_terms({"use_cayley_neumann": True} | config)  # OFT's default is the series
    options = {"block_share": config.get("block_share", False), "coft": config.get("coft", False)}
    layer = OFTLinear(base, r=base.in_features // b, eps=config.get("eps", 6e-5), neumann_terms=neumann, **options)
    return fill(layer, {"Q": -upper if neumann else upper})


def boft_layer(model, config, path, found):
    # PEFT trains full b×b blocks M and uses only their skew part (M − Mᵀ)/2: we keep its upper entries.
    M = found["boft_R"]
    m, n, b, _ = M.shape
    skew = (M - M.transpose(-1, -2)) / 2
    rows, cols = torch.triu_indices(b, b, 1)
    base = base_linear(model, path, config.get("fan_in_fan_out", False))
    layer = BOFTLinear(base, block_size=b, factors=m, block_dropout=config.get("boft_dropout", 0.0))
    return fill(layer, {"Q": skew[..., rows, cols], "s": found["boft_s"].flatten()})


def hra_layer(model, config, path, found):
    u = found["hra_u"]
    layer = HRALinear(base_linear(model, path, False), r=u.shape[1], gram_schmidt=config.get("apply_GS", False))
    return fill(layer, {"u": u})


def road_layer(model, config, path, found):
    # RoAd₄ is saved group by group, [cos-term angles (g), sin-term angles (g)] for each group of g
    # outputs; ours keeps the two terms as two rows of d_out.
    variant, g = config.get("variant", "road_1"), config.get("group_size", 64)
    layer = RoAdLinear(base_linear(model, path, False), variant=variant, group_size=g)
    theta, alpha = found["road_theta"], found["road_alpha"]
    if variant == "road_4":
        theta, alpha = (t.reshape(-1, 2, g).transpose(0, 1).reshape(2, -1) for t in (theta, alpha))
    return fill(layer, {"theta": theta[None], "alpha": alpha[None]})


def neumann_terms(config) -> int:
    """The Cayley–Neumann terms of an OFT or PSOFT config (0: the exact Cayley transform)."""
    terms = config.get("num_cayley_neumann_terms", 5) if config.get("use_cayley_neumann") else 0
    if terms == 3:
        raise UnsupportedAdapter(
            "num_cayley_neumann_terms = 3: PEFT 0.21 then sums the series to Q³ (as for 4 terms), "
            "not the 3-term series; the reference does not copy that"
        )
    return terms


def osf_layer(model, config, path, found):
    # The frozen top directions are not saved: they are W₀'s, recomputed here by the same SVD.
    base = base_linear(model, path, False)
    k = min(base.in_features, base.out_features) - found["osf_svd_params.S_low"].shape[0]
    names = {"osf_svd_params.U_low": "U_low", "osf_svd_params.S_low": "S_low", "osf_svd_params.V_low": "V_low"}
    return fill(OSFLinear(base, k=k), {ours: found[theirs] for theirs, ours in names.items()})


def psoft_layer(model, config, path, found):
    if config.get("psoft_svd", "full") != "full":
        raise UnsupportedAdapter(
            f"psoft_svd = {config['psoft_svd']!r}: PSOFT's randomised low-rank SVD is not supported (only 'full')"
        )
    split = {"psoft_init": "psoft", "pissa_init": "pissa"}.get(config.get("ab_svd_init", "psoft_init"))
    if split is None:
        raise UnsupportedAdapter(f"ab_svd_init = {config['ab_svd_init']!r} is not supported")
    layer = PSOFTLinear(
        base_linear(model, path, config.get("fan_in_fan_out", False)),
        r=config["r"],
        orthogonal=config.get("psoft_orth", True),
        scale_in="psoft_R.vector_a" in found,
        scale_out="psoft_R.vector_b" in found,
        neumann_terms=neumann_terms(config),
        neumann_eps=config.get("cayley_neumann_eps"),
        split=split,
        dropout=config.get("psoft_dropout", 0.0),
    )
    values = {"Q" if layer.orthogonal else "M": found["psoft_R"]}
    values |= {
        ours: found[f"psoft_R.{theirs}"]
        for ours, theirs in (("alpha", "vector_a"), ("beta", "vector_b"))
        if f"psoft_R.{theirs}" in found
    }
    return fill(layer, values)


def deft_layer(model, config, path, found):
    P = found["deft_P"]
    layer = DEFTLinear(
        base_linear(model, path, config.get("fan_in_fan_out", False)),
        r=P.shape[1],
        projector=config.get("decomposition_method", "relu"),
        alpha=config.get("alpha"),
        para=config.get("para", False),
        dropout=config.get("deft_dropout", 0.0),
    )
    return fill(layer, {"P": P} | ({} if layer.para else {"R": found["deft_R"]}))


def frod_layer(shared):
    """FRoD's bases and rotational positions are saved once per role (`base_model.frod_V.<role>`)."""
    if not any(key.startswith("base_model.frod_V.") for key in shared):
        raise UnsupportedAdapter("FRoD adapter saved with save_projection=False: the shared bases are not in the file")

    def build(model, config, path, found):
        role = layer_role(path)
        V, positions = shared[f"base_model.frod_V.{role}"], shared[f"base_model.frod_s_indices.{role}"]
        base = base_linear(model, path, config.get("fan_in_fan_out", False))
        layer = FRoDLinear(base, V, positions, dropout=config.get("frod_dropout", 0.0))
        return fill(layer, {"lambda_": found["frod_lambda_l"], "s": found["frod_lambda_s_values"]})

    return build


def fourierft_layer(model, config, path, found):
    # The positions are not saved: PEFT redraws them from random_loc_seed, and so do we.
    spectrum = found["fourierft_spectrum"]
    base = base_linear(model, path, config.get("fan_in_fan_out", False))
    layer = FourierFTLinear(base, n=spectrum.shape[0], alpha=config["scaling"], seed=config["random_loc_seed"])
    return fill(layer, {"c": spectrum})


def waveft_layer(model, config, path, found):
    # As FourierFT: the positions follow from random_loc_seed; n (n_frequency_pattern, proportional_parameters
    # included) from the saved coefficients.
    spectrum = found["waveft_spectrum"]
    base = base_linear(model, path, config.get("fan_in_fan_out", False))
    layer = WaveFTLinear(
        base,
        n=spectrum.shape[0],
        scale=config["scaling"],
        wavelet=config["wavelet_family"],
        seed=config["random_loc_seed"],
        idwt=config["use_idwt"],
    )
    return fill(layer, {"c": spectrum})


def c3a_layer(model, config, path, found):
    kernel = found["c3a_kernel"]
    return fill(C3ALinear(base_linear(model, path, False), block_size=kernel.shape[-1]), {"w": kernel})


def ln_tuning_layer(model, config, path, found):
    norm = model.get_submodule(path)
    if not is_norm(norm):
        raise UnsupportedAdapter(f"LN tuning at {path!r}: a {type(norm).__name__} is not a normalisation layer")
    layer = TunedNorm(norm)
    for name, tensor in found.items():  # ln_tuning_layers (its weight) and ln_tuning_layers.bias
        target = getattr(layer.tuned, name.removeprefix("ln_tuning_layers").removeprefix(".") or "weight")
        if target.shape != tensor.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} in the checkpoint, {tuple(target.shape)} here")
        target.copy_(tensor)
    return layer


def beft_layer(model, config, path, found):
    layer = BiasTunedLinear(base_linear(model, path, config.get("fan_in_fan_out", False)))
    return fill(layer, {"beta": found["beft_bias"].flatten()})


def shira_layer(model, config, path, found):
    # The mask is saved (whatever mask function made it), so no seed is needed to rebuild it.
    base = base_linear(model, path, config.get("fan_in_fan_out", False))
    return fill(SHiRALinear(base, positions=found["shira_indices"]), {"s": found["shira_weight"]})


def supertuning_layer(model, config, path, found):
    # The support is saved unless save_precomputed_indices is off; then it is scored again from the weight,
    # as PEFT does (ties in |W| could then order differently).
    base = base_linear(model, path, config.get("fan_in_fan_out", False))
    positions = found.get("supertuning_indices")
    lora = {"A": found["supertuning_lora_A"], "B": found["supertuning_lora_B"]} if config.get("r") else {}
    layer = SuperTuningLinear(
        base,
        sparsity=config["sparsity"],
        top=config["select_top"],
        r=config.get("r") or 0,
        alpha=config.get("lora_alpha"),
        dropout=config.get("lora_dropout", 0.0),
        positions=positions,
    )
    return fill(layer, {"s": found["supertuning_values"]} | lora)


def trainable_tokens_layer(model, config, path, found):
    embedding = model.get_submodule(path)
    if not isinstance(embedding, nn.Embedding):
        raise UnsupportedAdapter(
            f"trainable tokens at {path!r}: a {type(embedding).__name__}, not an nn.Embedding (PEFT adapts an "
            f"output head tied to the embedding too; tied models are not supported)"
        )
    if tied_to(model, path):  # PEFT then adapts the tied head too; ours would leave it with the old rows
        raise UnsupportedAdapter(
            f"trainable tokens at {path!r}: its weight is tied to {tied_to(model, path)[0]!r}; tied models are not "
            f"supported"
        )
    layer = TrainableTokens(embedding, list(config["token_indices"]))
    return fill(layer, {"rows": found["trainable_tokens_delta"]})


def pvera_layer(config, shared):
    """PVeRA's frozen A and B are saved once for the model (`base_model.pvera_A`, `base_model.pvera_B`)."""
    if "base_model.pvera_A" not in shared:
        raise UnsupportedAdapter("PVeRA adapter saved with save_projection=False: the projections are not in the file")
    A, B = shared["base_model.pvera_A"], shared["base_model.pvera_B"]
    projections = PVeRAShared(B.shape[1], A.shape[1], B.shape[0])
    with torch.no_grad():
        projections.A.copy_(A), projections.B.copy_(B)

    def build(model, config, path, found):
        base = base_linear(model, path, config.get("fan_in_fan_out", False))
        options = {
            "dropout": config.get("pvera_dropout", 0.0),
            "sample_at_inference": config.get("sample_at_inference"),
        }
        layer = PVeRALinear(base, projections, **options)
        return fill(layer, {"lambda_d": found["pvera_lambda_d"], "lambda_b": found["pvera_lambda_b"]})

    return build


def topk_logits(indices: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """Logits whose top-k softmax gives the saved mixture: log w at the k indices, −∞ elsewhere.
    PEFT saves k − 1 weights per piece; the last is what makes them sum to 1."""
    weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
    logits = torch.full((*indices.shape[:-1], n), float("-inf"))
    return logits.scatter(-1, indices.long(), weights.log())


def vblora_layer(config, shared):
    """VB-LoRA's bank is saved once for the model (`base_model.vblora_vector_bank`)."""
    vectors = shared["base_model.vblora_vector_bank"]
    bank = VectorBank(*vectors.shape)
    with torch.no_grad():
        bank.vectors.copy_(vectors)

    def build(model, config, path, found):
        base = base_linear(model, path, config.get("fan_in_fan_out", False))
        layer = VBLoRALinear(base, bank, r=config["r"], k=config["topk"])
        if "vblora_logits_A" in found:
            return fill(layer, {"logits_A": found["vblora_logits_A"], "logits_B": found["vblora_logits_B"]})
        # save_only_topk_weights: the k chosen indices and k − 1 weights per piece
        n = vectors.shape[0]
        return fill(
            layer,
            {
                f"logits_{side}": topk_logits(
                    found[f"vblora_logits_{side}_topk_indices"], found[f"vblora_logits_{side}_topk_weights"], n
                )
                for side in "AB"
            },
        )

    return build


def randlora_layer(model, config, path, found):
    # PEFT saves the shared bases with every layer: A (r × 1 × d_min) and B (d_max × n × r). It pairs
    # the layer's columns of B, flattened basis-major, with its rows of scaled A, flattened rank-major;
    # this layer's own copy of B is renumbered so that Bⱼ's column i meets λⱼᵢ as in the paper.
    base = base_linear(model, path, config.get("fan_in_fan_out", False))
    lambda_, gamma = found["randlora_lambda"].T, found["randlora_gamma"]  # PEFT keeps λ as (r × n)
    n, d_min = gamma.shape
    r, d_max = lambda_.shape[1], max(base.in_features, base.out_features)
    flat = found["randlora_B"][:d_max, :n].flatten(1)  # (d_max, n r): column j r + i is PEFT's
    bases = RandLoRABases(r, d_min, d_max)
    bases.A = found["randlora_A"][:, 0, :d_min].clone()
    bases.B = flat.reshape(d_max, r, n).permute(2, 0, 1).contiguous()  # Bⱼ[:, i] = column i n + j
    layer = RandLoRALinear(base, bases, alpha=config["randlora_alpha"], dropout=config.get("randlora_dropout", 0.0))
    return fill(layer, {"lambda_": lambda_, "gamma": gamma})


def targeted_modules(model: nn.Module, targets) -> list[str]:
    """The paths PEFT's `target_modules` selects, in model order: a string is a regex over the whole
    path, a list names paths or path endings."""
    if isinstance(targets, str):
        return [path for path, _ in model.named_modules() if re.fullmatch(targets, path)]
    return [path for path, _ in model.named_modules() if any(path == t or path.endswith("." + t) for t in targets)]


def unilora_layers(model, config, shared, by_module) -> dict[str, nn.Module]:
    """Uni-LoRA's θ_d is saved once (`base_model.unilora_theta_d`); each layer's entries of it are saved
    only with `save_indices`, and otherwise drawn again as PEFT draws them (the same seed, layer order)."""
    theta = shared["base_model.unilora_theta_d"]
    vector = SharedVector(theta.shape[0])
    vector.theta.copy_(theta)
    paths = list(by_module) or targeted_modules(model, config["target_modules"])
    layers = {
        path: UniLoRALinear(base_linear(model, path, config.get("fan_in_fan_out", False)), vector, r=config["r"])
        for path in paths
    }
    if not by_module:
        assign(list(layers.values()), theta.shape[0], config["proj_seed"])
        return layers
    names = {"index_A": "unilora_indices_A", "index_B": "unilora_indices_B"}
    names |= {"scale_A": "unilora_scales_A", "scale_B": "unilora_scales_B"}
    for path, layer in layers.items():
        fill(layer, {ours: by_module[path][theirs] for ours, theirs in names.items()})
    return layers


def tinylora_layers(model, config, shared, by_module) -> dict[str, nn.Module]:
    """TinyLoRA's trained vectors are saved once per group (`base_model.tinylora_v.<group>`), each layer's
    frozen SVD factors with the layer, and its random cores too unless `save_projection` is off; then
    they are drawn again as PEFT draws them, from projection_seed plus the layer's index in model order."""
    order = {path: index for index, (path, _) in enumerate(model.named_modules())}
    paths = sorted(by_module, key=order.__getitem__)
    groups = tinylora_groups(len(paths), config["weight_tying"])
    vectors = {}
    for key, tensor in shared.items():  # base_model.tinylora_v.<group>
        vectors[int(key.rsplit(".", 1)[1])] = fill(SharedVector(tensor.shape[0], bound=0.0), {"theta": tensor})
    if set(vectors) != set(groups):
        raise ValueError(
            f"TinyLoRA's weight tying gives groups {sorted(set(groups))}, the checkpoint {sorted(vectors)}"
        )
    layers = {}
    for index, (path, group) in enumerate(zip(paths, groups)):
        found, base = by_module[path], base_linear(model, path, config.get("fan_in_fan_out", False))
        seed, dropout = config["projection_seed"] + index, config.get("tinylora_dropout", 0.0)
        layer = TinyLoRALinear(base, vectors[group], r=found["tinylora_A"].shape[0], seed=seed, dropout=dropout)
        saved = {"A": found["tinylora_A"], "B": found["tinylora_B"]}
        layers[path] = fill(layer, saved | ({"P": found["tinylora_P"]} if "tinylora_P" in found else {}))
    return layers


def poly_layer(model, config, path, found):
    # PEFT's router keeps the logits as (tasks, heads · skills); ours as (tasks, heads, skills).
    if config.get("poly_type", "poly") != "poly":
        raise UnsupportedAdapter(f"Poly poly_type {config['poly_type']!r} is not supported (only 'poly')")
    A, B, logits = found["poly_lora_A"], found["poly_lora_B"], found["poly_router.module_logits"]
    heads, skills, _, r = A.shape
    base = base_linear(model, path, False)
    layer = PolyLoRALinear(base, tasks=logits.shape[0], skills=skills, r=r, heads=heads)
    return fill(layer, {"A": A, "B": B, "logits": logits.view(-1, heads, skills)})


def adamss_layer(model, config, path, found):
    # The clusters are not saved: PEFT finds them again from the weight (its SVD seed, its k-means), and so
    # do we; the basis Vᵀ and every cluster's A and B are saved, and the ranks read from them.
    count = len([name for name in found if name.startswith("adamss_A.")])
    A = [found[f"adamss_A.{k}"] for k in range(count)]
    base = base_linear(model, path, config.get("fan_in_fan_out", False))
    R, ranks = found["adamss_newB"].shape[0], [a.shape[0] for a in A]
    layer = AdaMSSLinear(base, R=R, K=config["num_subspaces"], r=ranks, seed=config["random_seed"])
    if len(layer.A) != count:
        raise ValueError(f"the weight clusters into {len(layer.A)} subspaces here, {count} in the checkpoint")
    saved = {"Vt": found["adamss_newB"]} | {f"A.{k}": A[k] for k in range(count)}
    return fill(layer, saved | {f"B.{k}": found[f"adamss_B.{k}"] for k in range(count)})


def miss_layer(model, config, path, found):
    # PEFT picks MiSS's variant with init_weights: True (balance), "mini" or "bat".
    variant = {True: "balance", "mini": "mini", "bat": "bat"}.get(config.get("init_weights", True))
    if variant is None:
        raise UnsupportedAdapter(f"MiSS init_weights = {config['init_weights']!r} is not supported")
    D = found["miss_block"]
    r = D.shape[-1] if variant == "bat" else D.shape[0]
    base = base_linear(model, path, config.get("fan_in_fan_out", False))
    mini_r = config.get("mini_r", 1)
    layer = MiSSLinear(base, r=r, variant=variant, mini_r=mini_r, dropout=config.get("miss_dropout", 0.0))
    return fill(layer, {"D": D})


def gralora_layer(model, config, path, found):
    # PEFT stores A as (k, d_in/k, r), row group m of A_n serving block (m, n), and B as (k, r, d_out/k),
    # column group n of B_m serving block (m, n); ours holds each block's own pair.
    A, B = found["gralora_A"], found["gralora_B"]
    k, r = A.shape[0], A.shape[2]
    hybrid_r = found["gralora_A_general"].shape[0] if "gralora_A_general" in found else 0
    base = base_linear(model, path, config.get("fan_in_fan_out", False))
    layer = GraLoRALinear(
        base, r=r, alpha=config["alpha"], k=k, hybrid_r=hybrid_r, dropout=config.get("gralora_dropout", 0.0)
    )
    values = {
        "A": A.unflatten(2, (k, r // k)).permute(2, 0, 3, 1),  # [n, i, m, s] → [m, n, s, i]
        "B": B.unflatten(1, (k, r // k)).permute(0, 1, 3, 2),  # [m, n, s, o] → [m, n, o, s]
    }
    if hybrid_r:
        values |= {"A_h": found["gralora_A_general"], "B_h": found["gralora_B_general"]}
    return fill(layer, values)


def peanut_layer(model, config, path, found):
    activation = config.get("act_fn", "relu")
    if activation not in ACTIVATIONS:
        raise UnsupportedAdapter(f"PEANuT act_fn = {activation!r} is not supported (only {sorted(ACTIVATIONS)})")
    depth = sum(name.startswith("peanut_encoders.") for name in found)
    base = base_linear(model, path, config.get("fan_in_fan_out", False))
    r = found["peanut_A"].shape[0]
    layer = PEANuTLinear(base, r=r, depth=depth, activation=activation, scale=config.get("scaling", 1.0))
    values = {"A.weight": found["peanut_A"], "B.weight": found["peanut_B"]}
    for side in ("encoders", "decoders"):
        values |= {f"{side}.{i}.weight": found[f"peanut_{side}.{i}"] for i in range(depth)}
    return fill(layer, values)


def lily_layer(model, config, path, found):
    # PEFT saves the shared A and experts with every layer that uses them: each gets its own copy here.
    A, B, router = found["lily_A"], found["lily_B"], found["lily_router"]
    experts, r = router.shape
    base = base_linear(model, path, config.get("fan_in_fan_out", False))
    down, shared = LilyDown(base.in_features, r), LilyExperts(r, base.out_features, experts)
    fill(down, {"A": A})
    fill(shared, {"B": B.reshape(experts, r, -1)})
    return fill(LilyLinear(base, down, shared, scale=config.get("scaling", 1.0)), {"router": router})


def glora_layer(model, config, path, found):
    supports = {"weight_supports": config.get("config_A_B", "lora"), "prompt": config.get("config_C", "lora")}
    supports["bias_supports"] = config.get("config_D_E", "constant")
    layer = GLoRALinear(base_linear(model, path, False), r=config["r"], **supports)
    parts = {"Xd": "down", "Xu": "up", "X": "value"}  # PEFT's names of a support's tensors
    values = {}
    for name, tensor in found.items():  # e.g. glora_A.Xd
        support, part = name.removeprefix("glora_").split(".")
        values[f"{support}.{parts[part]}"] = tensor
    return fill(layer, values)


def adaption_prompt_layer(model, path, key, tensors):
    attention = model.get_submodule(path)
    prompt, gate = tensors[key][0], tensors[key.replace("adaption_prompt", "adaption_gate")]
    adapted = AdaptedAttention(attention, prompt.shape[0], prompt.shape[1], model.config.num_attention_heads)
    adapted.prompt.copy_(prompt)
    adapted.gate.copy_(gate.reshape(-1, 1, 1).expand_as(adapted.gate[0]).unsqueeze(0))  # one gate, every head
    return adapted


# ShadowPEFT's fields: the ones the wrapper takes, the ones that must keep their defaults, bookkeeping.
SHADOW_OPTIONS = {
    "r": "r",
    "shadow_alpha": "alpha",
    "shadow_dropout": "dropout",
    "shadow_num_hidden_layers": "shadow_layers",
    "shadow_hidden_size": "shadow_hidden",
    "shadow_intermediate_size": "shadow_intermediate",
    "shadow_num_attention_heads": "shadow_heads",
    "update_hidden_size": "update_hidden",
    "auxiliary_loss_weight": "auxiliary_weight",
    "share_embeddings": "share_embeddings",
}
SHADOW_FIXED = {"shadow_model": "mirror", "task_type": "CAUSAL_LM"}
SHADOW_IGNORED = {"peft_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
                  "init_weights", "target_modules", "exclude_modules"}  # fmt: skip


def shadow_model(model, config, tensors) -> ShadowPEFT:
    """PEFT's ShadowPEFT checkpoint as a ShadowPEFT wrapper around the model (every decoder block wrapped)."""
    for field, value in config.items():
        if field in SHADOW_FIXED and value != SHADOW_FIXED[field]:
            raise UnsupportedAdapter(f"ShadowPEFT {field} = {value!r} is not supported (only {SHADOW_FIXED[field]!r})")
        if field not in SHADOW_OPTIONS and field not in SHADOW_FIXED and field not in SHADOW_IGNORED and value:
            raise UnsupportedAdapter(f"adapter_config.json field {field!r} = {value!r} is not supported")
    options = {ours: config[field] for field, ours in SHADOW_OPTIONS.items() if config.get(field) is not None}
    blocks = [key.removeprefix("base_model.model.").split(".shadow_")[0] for key in tensors if ".shadow_down." in key]
    layers = model.get_submodule("model.layers")
    if sorted(blocks) != sorted(f"model.layers.{i}" for i in range(len(layers))):
        raise UnsupportedAdapter("ShadowPEFT on some decoder blocks only is not supported: it must wrap them all")
    wrapped = ShadowPEFT(model, **options)
    state = {}
    for key, tensor in tensors.items():
        name = key.removeprefix("base_model.").replace(".default.", ".").replace(".default", "")
        name = name.removeprefix("model.")  # the decoder blocks' parameters live under the wrapped model
        name = re.sub(r"\.shadow_(down|up)\.", r".\1.", name)
        name = re.sub(r"\.shadow_update_(gate|transform)\.", r".\1.", name)
        name = name.replace("shadow_backbone.", "backbone.", 1).replace("shadow_projection.", "projection.", 1)
        state[name if name.startswith(("backbone.", "projection.")) else f"model.{name}"] = tensor
    trained = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    if set(state) != trained or any(wrapped.get_parameter(n).shape != t.shape for n, t in state.items()):
        for index, block in enumerate(list(layers)):  # leave the model as it was
            layers[index] = block.block if isinstance(block, ShadowBlock) else block
        missing, unexpected = sorted(trained - set(state)), sorted(set(state) - trained)
        raise UnsupportedAdapter(
            f"ShadowPEFT checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            f"{'' if missing or unexpected else ', or shapes differ'}; the model was left unchanged"
        )
    wrapped.load_state_dict(state, strict=False)
    freeze_model(wrapped)  # loaded for use, as the other adapters
    return wrapped.eval() if not model.training else wrapped
