"""The method-comparison table: every method applied, with its paper's default configuration, to two
stated model layouts, and its trainable parameters counted from the injected model itself.

The models are transformers' BERT and LLaMA classes at the sizes of BERT-base and Llama-2-7B, built
on PyTorch's `meta` device: every tensor has a shape and no storage, so a 7B-parameter model costs
no memory and the whole table takes about a second. The site's comparison page
(catalog/comparison.py) renders what `compare()` returns; tests/test_comparison.py checks the counts
against the papers' parameter formulas.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from reference_impls import (
    adamss,
    bottleneck,
    context_prompts,
    delora,
    expert_mixing,
    frod,
    glora,
    ia3,
    lily,
    lora,
    lora_bayesian,
    lora_inits,
    lora_quant,
    lora_serving,
    low_memory,
    orthogonal,
    phm,
    prefixes,
    products,
    projections,
    prompts,
    reft,
    road,
    routing,
    selective,
    shadow,
    shared_bases,
    sparse,
    spectral,
    structured,
    subspace,
    unified,
)
from reference_impls._plumbing import count_parameters


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    build: Callable[[], nn.Module]
    attention: tuple[str, str, str, str]  # name endings of the query, key, value and output projections
    ffn: tuple[str, str]  # the feed-forward block's name ending, and its down (second) projection's own name
    attention_block: str  # the attention sublayer an adapter goes after
    add_norm: bool  # post-norm Add & Norm blocks (BERT) rather than pre-norm residuals (LLaMA)
    width: int
    layers: int


def _bert_base() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(), add_pooling_layer=False)  # the defaults are BERT-base's


def _llama_2_7b() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    )
    return LlamaForCausalLM(config)


LAYOUTS = (
    Layout(
        "BERT-base",
        "encoder, 12 layers, width 768, FFN 3072, vocabulary 30,522 (no pooler)",
        _bert_base,
        ("query", "key", "value", "attention.output.dense"),
        ("output", "dense"),
        "attention.output",
        True,
        768,
        12,
    ),
    Layout(
        "Llama-2-7B",
        "decoder, 32 layers, width 4096, FFN 11008, vocabulary 32,000",
        _llama_2_7b,
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        ("mlp", "down_proj"),
        "self_attn",
        False,
        4096,
        32,
    ),
)


def _ending(model: nn.Module, ending: str) -> list[str]:
    """Full names of the modules whose name ends with `ending` ("attention.output.dense" as a whole)."""
    return [name for name, _ in model.named_modules() if name.endswith("." + ending)]


def _ffn_blocks(model: nn.Module, layout: Layout) -> list[str]:
    """Full names of the feed-forward blocks (BERT's `output` names two blocks; take the FFN's)."""
    return [name for name in _ending(model, layout.ffn[0]) if "attention" not in name]


def _attention_blocks(model: nn.Module, layout: Layout) -> list[str]:
    return _ending(model, layout.attention_block)


def _ffn_down(model: nn.Module, layout: Layout) -> list[str]:
    return [f"{block}.{layout.ffn[1]}" for block in _ffn_blocks(model, layout)]


def _layer_outputs(model: nn.Module, layout: Layout) -> list[str]:
    return [f"{'encoder.layer' if layout.add_norm else 'model.layers'}.{index}" for index in range(layout.layers)]


@dataclass(frozen=True)
class Method:
    name: str
    impl: str  # the module whose page the row links to
    configuration: str  # the paper's default, as applied here
    apply: Callable[[nn.Module, Layout], nn.Module | None]  # injects; returns the model to count
    merges: bool  # the update folds into the weights: no inference cost
    longer_sequence: bool  # adds positions to the sequence (prompts, prefixes)
    peft: str  # HF PEFT's equivalent, or "" where PEFT has none


def _lora(**options):
    def apply(model, layout):
        lora.inject_lora(model, [layout.attention[0], layout.attention[2]], **options)
        return model

    return apply


def _adalora(model, layout):
    projections = [name for ending in layout.attention for name in _ending(model, ending)]
    lora.inject_adalora(model, projections, r=12)
    return model


def _products(method, **options):
    def apply(model, layout):
        products.inject_products(model, [layout.attention[0], layout.attention[2]], method, **options)
        return model

    return apply


def _orthogonal(method, **options):
    def apply(model, layout):
        orthogonal.inject_orthogonal(model, [layout.attention[0], layout.attention[2]], method, **options)
        return model

    return apply


def _road(model, layout):
    road.inject_road(model, [layout.attention[0], layout.attention[2]], variant="road_1", group_size=64)
    return model


def _initialised_lora(init):
    def apply(model, layout):
        lora_inits.inject_initialised_lora(model, [layout.attention[0], layout.attention[2]], init, r=8, alpha=16)
        return model

    return apply


def _started_from_data(model, layout):
    # EVA, CorDA and LoRA-GA compute their start from batches of data, which a layout on the meta
    # device has none of; their trained parameters are LoRA's (EVA moves rank between layers, and
    # here both targets have the same widths, so its total is LoRA's too).
    lora.inject_lora(model, [layout.attention[0], layout.attention[2]], r=8, alpha=16)
    return model


def _loftq(model, layout):
    lora_quant.inject_loftq(model, [layout.attention[0], layout.attention[2]], r=8, alpha=16)
    return model


def _qalora(model, layout):
    lora_quant.inject_qalora(model, [layout.attention[0], layout.attention[2]], r=8, alpha=16, group_size=16)
    return model


def _velora(model, layout):
    low_memory.inject_velora(model, [layout.attention[0], layout.attention[2]], r=8, alpha=16, groups=64)
    return model


def _galore(model, layout):
    return model  # every weight trains; GaLore's saving is in the optimiser's moments, not in parameters


def _lora_experts(model, layout, count=2):
    experts = [copy.deepcopy(model) for _ in range(count)]
    for expert in experts:
        lora.inject_lora(expert, [layout.attention[0], layout.attention[2]], r=8, alpha=16)
    return experts


def _xlora(model, layout):
    return expert_mixing.XLoRA(model, _lora_experts(model, layout), hidden_size=layout.width, depth=1)


def _arrow(model, layout):
    expert_mixing.inject_experts(model, _lora_experts(model, layout))  # Arrow's routing adds and trains nothing
    return model


def _mtl_lora(model, layout):
    routing.inject_mtl_lora(model, [layout.attention[0], layout.attention[2]], tasks=4, r=8, alpha=16, up_projections=3)
    return model


def _shadow(model, layout):
    if layout.add_norm:
        return None  # PEFT's ShadowPEFT is for decoder-only language models
    return shadow.ShadowPEFT(model, r=8)


def _monteclora(model, layout):
    lora_bayesian.inject_monteclora(model, [layout.attention[0], layout.attention[2]], r=8, alpha=16, samples=8)
    return model


def _kasa(model, layout):
    lora_inits.inject_kasa(model, [layout.attention[0], layout.attention[2]], r=8, alpha=16)
    return model


def _block_diagonal_lora(model, layout):
    query_and_value = [layout.attention[0], layout.attention[2]]  # column-parallel under tensor parallelism
    lora_serving.inject_block_diagonal_lora(model, query_and_value, row_parallel=[], r=8, alpha=16, blocks=4)
    return model


def _adamss(model, layout):
    adamss.inject_adamss(model, [layout.attention[0], layout.attention[2]], R=100, K=5, r=1)
    return model


def _subspace(method, **options):
    def apply(model, layout):
        subspace.inject_subspace(model, [layout.attention[0], layout.attention[2]], method, **options)
        return model

    return apply


def _frod(model, layout):
    frod.inject_frod(model, [layout.attention[0], layout.attention[2]], sparse_rate=0.01)
    return model


def _spectral(method, **options):
    def apply(model, layout):
        spectral.inject_spectral(model, [layout.attention[0], layout.attention[2]], method, **options)
        return model

    return apply


def _ln_tuning(model, layout):
    norms = [name for name, module in model.named_modules() if selective.is_norm(module)]
    selective.inject_ln_tuning(model, norms)
    return model


def _beft(model, layout):
    selective.inject_beft(model, [layout.attention[2]])
    return model


def _shira(model, layout):
    selective.inject_shira(model, [layout.attention[0], layout.attention[2]], r=8)
    return model


def _pvera(model, layout):
    shared_bases.inject_pvera(model, [layout.attention[0], layout.attention[2]], r=256)
    return model


def _vblora(model, layout):
    shared_bases.inject_vblora(model, [layout.attention[0], layout.attention[2]], r=4, n=256, length=256, k=2)
    return model


def _randlora(model, layout):
    shared_bases.inject_randlora(model, [layout.attention[0], layout.attention[2]], r=32, alpha=640.0)
    return model


def _unilora(model, layout):
    projections.inject_unilora(model, [layout.attention[0], layout.attention[2]], r=4, d=256)
    return model


def _tinylora(model, layout):
    projections.inject_tinylora(model, [layout.attention[0], layout.attention[2]], r=2, u=64)
    return model


def _structured(method, **options):
    def apply(model, layout):
        structured.inject_structured(model, [layout.attention[0], layout.attention[2]], method, **options)
        return model

    return apply


def _lily(model, layout):
    lily.inject_lily(model, [layout.attention[0], layout.attention[2]], r=32, stride=1, experts=2)
    return model


def _glora(model, layout):
    glora.inject_glora(model, [layout.attention[0], layout.attention[2]], r=4)
    return model


def _delora(model, layout):
    delora.inject_delora(model, [layout.attention[0], layout.attention[2]], r=8, lambda_=15.0)
    return model


def _vera(model, layout):
    lora.inject_vera(model, [layout.attention[0], layout.attention[2]], r=256)
    return model


def _ia3(model, layout):
    down = _ffn_down(model, layout)  # rescaled at their input: the FFN's inner activation
    ia3.inject_ia3(model, [layout.attention[1], layout.attention[2]] + down, down)
    return model


def _houlsby(model, layout):
    bottleneck.inject_adapters(model, _attention_blocks(model, layout) + _ffn_blocks(model, layout), m=64)
    return model


def _pfeiffer(model, layout):
    placement = "after_norm" if layout.add_norm else "sequential"
    bottleneck.inject_adapters(model, _ffn_blocks(model, layout), m=layout.width // 16, placement=placement)
    return model


def _adapter_plus(model, layout):
    bottleneck.inject_adapters(model, _ffn_blocks(model, layout), m=layout.width // 96, **bottleneck.ADAPTER_PLUS)
    return model


def _parallel(model, layout):
    bottleneck.inject_adapters(model, _ffn_blocks(model, layout), m=512, placement="parallel", scale=4.0)
    return model


def _compacter(model, layout):
    phm.inject_compacter(
        model, _attention_blocks(model, layout) + _ffn_blocks(model, layout), m=layout.width // 16, n=4
    )
    return model


def _loreft(model, layout):
    reft.inject_loreft(model, _layer_outputs(model, layout), d=layout.width, r=4)
    return model


def _bitfit(model, layout):
    if not layout.add_norm:
        return None  # LLaMA's linear layers and norms have no biases
    sparse.bitfit(model)
    return model


def _supertuning(model, layout):
    sparse.inject_supertuning(model, [layout.attention[0], layout.attention[2]], sparsity=0.99)
    return model


def _prompt_tuning(model, layout):
    return prompts.PromptTuning(model, n=20)


def _cpt(model, layout):
    if layout.add_norm:
        return None  # a context of examples for a causal language model
    examples = context_prompts.example_types([(4, 8, 2, 2)] * 4)  # 4 examples of 16 tokens
    return context_prompts.CPT(model, [0] * len(examples), examples)


def _prefix_tuning(model, layout):
    if layout.add_norm:
        return prefixes.inject_encoder_prefix(model, n=10, hidden=512)  # the prefixes hold the trainable part
    return prefixes.PrefixTuning(model, n=10, hidden=512)


def _llama_adapter(model, layout):
    if layout.add_norm:
        return None  # adaption prompts are written for LLaMA's attention
    prefixes.inject_llama_adapter(model, n=10, top_layers=30)
    return model


def _mam(model, layout):
    if layout.add_norm:
        return None  # its prefixes go into a causal LM's key/value cache
    return prefixes.inject_mam(model, (layout.ffn[0],), n=30, hidden=512, m=512)


def _unipelt(model, layout):
    if not layout.add_norm:
        return None  # written for a BERT-style encoder (post-norm blocks, attention.self)
    unified.inject_unipelt(model, r=8, n=10, prefix_hidden=512)
    return model


def _mov(model, layout):
    routing.inject_mov(model, [layout.attention[1], layout.attention[2]], experts=10)
    return model


def _poly(model, layout):
    routing.inject_poly(model, [layout.attention[0], layout.attention[2]], tasks=1, skills=4, r=8)
    return model


METHODS = (
    Method("LoRA", "lora", "r = 8, α = 16 on the query and value projections", _lora(r=8), True, False, "LoRA"),
    Method(
        "rsLoRA",
        "lora",
        "r = 8, α = 16, scale α/√r, on the query and value projections",
        _lora(r=8, use_rslora=True),
        True,
        False,
        "LoRA (use_rslora)",
    ),
    Method(
        "Block-diagonal LoRA",
        "lora_serving",
        "r = 8, α = 16, B block-diagonal over 4 shards on the query and value projections (column-parallel)",
        _block_diagonal_lora,
        True,
        False,
        "LoRA (use_bdlora)",
    ),
    Method(
        "PiSSA",
        "lora_inits",
        "LoRA's r = 8, α = 16, started from the top singular triplets (the base keeps the residual)",
        _initialised_lora("pissa"),
        True,
        False,
        "LoRA (init_lora_weights=pissa)",
    ),
    Method(
        "OLoRA",
        "lora_inits",
        "LoRA's r = 8, α = 16, started from W's QR factors (the base keeps the residual)",
        _initialised_lora("olora"),
        True,
        False,
        "LoRA (init_lora_weights=olora)",
    ),
    Method(
        "MiCA",
        "lora_inits",
        "LoRA's r = 8, α = 16, B fixed to the minor singular directions, A alone trained",
        _initialised_lora("mica"),
        True,
        False,
        "LoRA (init_lora_weights=mica)",
    ),
    Method(
        "EVA",
        "lora_data_inits",
        "LoRA's r = 8 budget, α = 16, A from the inputs' principal directions, ranks moved by explained variance",
        _started_from_data,
        True,
        False,
        "LoRA (init_lora_weights=eva)",
    ),
    Method(
        "CorDA",
        "lora_data_inits",
        "LoRA's r = 8, α = 16, started from the SVD of W times its inputs' covariance (the base keeps the rest)",
        _started_from_data,
        True,
        False,
        "LoRA (init_lora_weights=corda)",
    ),
    Method(
        "LoRA-GA",
        "lora_data_inits",
        "LoRA's r = 8, α = 16, started from the full gradient's singular vectors (the base keeps the rest)",
        _started_from_data,
        True,
        False,
        "LoRA (init_lora_weights=lora_ga)",
    ),
    Method(
        "LoftQ",
        "lora_quant",
        "LoRA's r = 8, α = 16 over an NF4 base chosen with the adapter's start (Q + BA ≈ W)",
        _loftq,
        True,
        False,
        "LoRA (init_lora_weights=loftq)",
    ),
    Method(
        "QA-LoRA",
        "lora_quant",
        "r = 8, α = 16, A over the means of groups of 16 inputs: merges into a 4-bit base's offsets",
        _qalora,
        True,
        False,
        "LoRA (use_qalora, GPTQ layers)",
    ),
    Method(
        "VeLoRA",
        "low_memory",
        "LoRA's r = 8, α = 16; A's gradient from 64 sub-token projections per input token",
        _velora,
        True,
        False,
        "LoRA (velora_config)",
    ),
    Method(
        "GaLore",
        "low_memory",
        "all weights trained; Adam's moments in a rank-r projection of each gradient",
        _galore,
        True,
        False,
        "",
    ),
    Method(
        "X-LoRA",
        "expert_mixing",
        "2 frozen LoRA experts (r = 8 on q and v), a one-layer classifier on the last hidden state",
        _xlora,
        False,
        False,
        "X-LoRA (xlora)",
    ),
    Method(
        "Arrow",
        "expert_mixing",
        "2 frozen LoRA experts (r = 8 on q and v), routed per token by their prototypes: nothing trained",
        _arrow,
        False,
        False,
        "LoRA (arrow_config)",
    ),
    Method(
        "MTL-LoRA",
        "routing",
        "r = 8, α = 16, 3 shared up-projections, a diagonal Λ_t and mixing weights for each of 4 tasks",
        _mtl_lora,
        True,
        False,
        "",
    ),
    Method(
        "ShadowPEFT",
        "shadow",
        "r = 8, a one-layer shadow backbone beside the decoder, gated state updates per block",
        _shadow,
        False,
        False,
        "SHADOW",
    ),
    Method(
        "MonteCLoRA",
        "lora_bayesian",
        "LoRA's r = 8, α = 16; A perturbed by a mixture of 8 Gaussian samples while training",
        _monteclora,
        True,
        False,
        "LoRA (monteclora_config)",
    ),
    Method(
        "KaSA",
        "lora_inits",
        "r = 8, α = 16, learned singular values, the base's 8 smallest components dropped",
        _kasa,
        True,
        False,
        "LoRA (kasa_config)",
    ),
    Method(
        "DoRA",
        "lora",
        "r = 8, α = 16 on the query and value projections",
        _lora(r=8, use_dora=True),
        True,
        False,
        "LoRA (use_dora)",
    ),
    Method("VeRA", "lora", "r = 256 on the query and value projections (shared A, B)", _vera, True, False, "VeRA"),
    Method(
        "PVeRA",
        "shared_bases",
        "r = 256 on the query and value projections (shared A, B)",
        _pvera,
        True,
        False,
        "PVERA",
    ),
    Method(
        "VB-LoRA",
        "shared_bases",
        "r = 4, a bank of 256 vectors of 256, top-2, on the query and value projections",
        _vblora,
        True,
        False,
        "VBLORA",
    ),
    Method(
        "RandLoRA",
        "shared_bases",
        "r = 32 (d/32 random bases), α = 640 on the query and value projections",
        _randlora,
        True,
        False,
        "RANDLORA",
    ),
    Method(
        "Uni-LoRA",
        "projections",
        "one θ_d of 256 for rank-4 LoRA on the query and value projections",
        _unilora,
        True,
        False,
        "UNILORA",
    ),
    Method(
        "TinyLoRA",
        "projections",
        "r = 2, u = 64 (PEFT's defaults), one v per layer, on the query and value projections",
        _tinylora,
        True,
        False,
        "TINYLORA",
    ),
    Method(
        "MiSS",
        "structured",
        "r = 64 (PEFT's default) on the query and value projections",
        _structured("miss", r=64),
        True,
        False,
        "MISS",
    ),
    Method(
        "GraLoRA",
        "structured",
        "r = 8, a 2 × 2 grid, α = 16 on the query and value projections",
        _structured("gralora", r=8, alpha=16.0, k=2),
        True,
        False,
        "GRALORA",
    ),
    Method(
        "PEANuT",
        "structured",
        "r = 32, no hidden layers (PEFT's defaults) on the query and value projections",
        _structured("peanut", r=32),
        True,
        False,
        "PEANUT",
    ),
    Method(
        "GLoRA",
        "glora",
        "rank-4 weight and prompt supports, constant bias supports, on the query and value projections",
        _glora,
        True,
        False,
        "GLORA",
    ),
    Method("AdaLoRA", "lora", "initial r = 12 on the attention projections", _adalora, True, False, "AdaLoRA"),
    Method("DeLoRA", "delora", "r = 8, λ = 15 on the query and value projections", _delora, True, False, "DELORA"),
    Method(
        "LoHa",
        "products",
        "r = 8, α = 8 on the query and value projections",
        _products("loha", r=8, alpha=8),
        True,
        False,
        "LOHA",
    ),
    Method(
        "LoKr",
        "products",
        "r = 8, α = 8 on the query and value projections (PEFT's factor rule)",
        _products("lokr", r=8, alpha=8),
        True,
        False,
        "LOKR",
    ),
    Method("HiRA", "products", "r = 8 on the query and value projections", _products("hira", r=8), True, False, "HIRA"),
    Method(
        "OFT",
        "orthogonal",
        "blocks of b = 32 (PEFT's default) on the query and value projections",
        _orthogonal("oft", block_size=32),
        True,
        False,
        "OFT",
    ),
    Method(
        "BOFT",
        "orthogonal",
        "m = 2 butterfly factors of blocks b = 8 on the query and value projections",
        _orthogonal("boft", block_size=8, factors=2),
        True,
        False,
        "BOFT",
    ),
    Method(
        "HRA",
        "orthogonal",
        "r = 8 reflections on the query and value projections",
        _orthogonal("hra", r=8),
        True,
        False,
        "HRA",
    ),
    Method("RoAd", "road", "RoAd₁, groups of 64, on the query and value projections", _road, True, False, "ROAD"),
    Method(
        "PSOFT",
        "subspace",
        "r = 8 (a rotation of the top 8 singular directions) on the query and value projections",
        _subspace("psoft", r=8),
        True,
        False,
        "PSOFT",
    ),
    Method("DEFT", "subspace", "r = 8 on the query and value projections", _subspace("deft", r=8), True, False, "DEFT"),
    Method(
        "AdaMSS",
        "adamss",
        "R = 100, K = 5 clusters of rank 1 (PEFT's defaults) on the query and value projections",
        _adamss,
        True,
        False,
        "ADAMSS",
    ),
    Method(
        "OSF",
        "subspace",
        "the lower half of the singular directions of the query and value projections (constrained full fine-tuning)",
        _subspace("osf"),
        True,
        False,
        "OSF",
    ),
    Method(
        "FourierFT",
        "spectral",
        "n = 1000 coefficients, α = 150 on the query and value projections",
        _spectral("fourierft", n=1000, alpha=150.0),
        True,
        False,
        "FOURIERFT",
    ),
    Method(
        "WaveFT",
        "spectral",
        "n = 2592 Haar-wavelet coefficients, s = 25 on the query and value projections",
        _spectral("waveft", n=2592, scale=25.0),
        True,
        False,
        "WAVEFT",
    ),
    Method(
        "C3A",
        "spectral",
        "circulant blocks of b = 256 (PEFT's default) on the query and value projections",
        _spectral("c3a", block_size=256),
        True,
        False,
        "C3A",
    ),
    Method("FRoD", "frod", "1% rotational degrees on the query and value projections", _frod, True, False, "FROD"),
    Method("(IA)³", "ia3", "keys, values and the FFN's down-projection input", _ia3, True, False, "IA3"),
    Method("Houlsby adapter", "bottleneck", "m = 64 after attention and after the FFN", _houlsby, False, False, ""),
    Method("Pfeiffer adapter", "bottleneck", "m = d/16 after the FFN", _pfeiffer, False, False, ""),
    Method("Scaled parallel adapter", "bottleneck", "m = 512, s = 4, beside the FFN", _parallel, False, False, ""),
    Method("Adapter+", "bottleneck", "m = d/96 after the FFN, channel-wise s", _adapter_plus, False, False, ""),
    Method("Compacter", "phm", "n = 4, m = d/16, rank 1, Houlsby's places", _compacter, False, False, ""),
    Method("LoReFT", "reft", "r = 4 on every layer's output, first 3 positions", _loreft, False, False, ""),
    Method("LN tuning", "selective", "every LayerNorm / RMSNorm", _ln_tuning, False, False, "LN_TUNING"),
    Method("BEFT", "selective", "a bias on every value projection", _beft, True, False, "BEFT"),
    Method(
        "SHiRA",
        "selective",
        "r = 8 (LoRA's count) on the query and value projections",
        _shira,
        True,
        False,
        "SHIRA",
    ),
    Method("BitFit", "sparse", "every bias", _bitfit, True, False, ""),
    Method(
        "Super-Tuning",
        "sparse",
        "the 1% of entries of largest magnitude (PEFT's default) of the query and value projections",
        _supertuning,
        True,
        False,
        "SUPERTUNING",
    ),
    Method(
        "Lily",
        "lily",
        "r = 32, 2 shared experts per projection type, query and value (PEFT's defaults)",
        _lily,
        False,
        False,
        "LILY",
    ),
    Method("MoV", "routing", "10 (IA)³ experts on keys and values, a router per layer", _mov, False, False, ""),
    Method("Polytropon", "routing", "4 LoRA skills of rank 8 on query and value, 1 task", _poly, False, False, "POLY"),
    Method(
        "UniPELT",
        "unified",
        "gated LoRA r = 8 (query, value), gated prefix of 10 (MLP 512), gated Pfeiffer adapter m = d/16",
        _unipelt,
        False,
        True,
        "",
    ),
    Method(
        "MAM adapter",
        "prefixes",
        "prefix of 30 (MLP 512) and a scaled parallel adapter m = 512 beside the FFN",
        _mam,
        False,
        True,
        "",
    ),
    Method("Prompt tuning", "prompts", "20 virtual tokens", _prompt_tuning, False, True, "PROMPT_TUNING"),
    Method("CPT", "context_prompts", "4 examples of 16 tokens in context, refined", _cpt, False, True, "CPT"),
    Method(
        "Prefix tuning",
        "prefixes",
        "10 prefix positions, MLP width 512 (trained; only the prefix is kept)",
        _prefix_tuning,
        False,
        True,
        "PREFIX_TUNING",
    ),
    Method(
        "LLaMA-Adapter",
        "prefixes",
        "10 adaption prompts in the top 30 layers, zero-init gates",
        _llama_adapter,
        False,
        True,
        "ADAPTION_PROMPT",
    ),
)


@dataclass(frozen=True)
class Row:
    method: Method
    trainable: dict[str, int | None]  # per layout name; None where the method does not apply
    base_total: dict[str, int]

    def percent(self, layout: str) -> float | None:
        count = self.trainable[layout]
        return None if count is None else 100.0 * count / self.base_total[layout]


def compare() -> list[Row]:
    """Every method on every layout: the trainable parameters of the injected model."""
    totals, models = {}, {}
    with torch.device("meta"):
        for layout in LAYOUTS:
            models[layout.name] = layout.build()
            totals[layout.name] = count_parameters(models[layout.name])[1]
    rows = []
    for method in METHODS:
        trainable = {}
        for layout in LAYOUTS:
            with torch.device("meta"):
                model = _fresh(models[layout.name])
                counted = method.apply(model, layout)
            trainable[layout.name] = None if counted is None else count_parameters(counted)[0]
        rows.append(Row(method, trainable, totals))
    return rows


def _fresh(model: nn.Module) -> nn.Module:
    """A trainable copy of the meta-device model (deepcopy of meta tensors copies shapes only)."""
    fresh = copy.deepcopy(model)
    fresh.requires_grad_(True)
    return fresh
