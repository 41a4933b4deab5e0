"""The method-comparison page: counts from the injected meta-device models equal the papers' formulas."""

import pytest

from reference_impls._comparison import LAYOUTS, compare
from reference_impls.products import kronecker_factors


@pytest.fixture(scope="module")
def rows():
    return {row.method.name: row for row in compare()}


def test_base_models_have_the_published_sizes(rows):
    totals = next(iter(rows.values())).base_total
    assert totals["BERT-base"] == 108_891_648  # BERT-base without its pooler (110M with pooler and heads)
    assert totals["Llama-2-7B"] == 6_738_415_616


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_counts_equal_the_parameter_formulas(rows, layout):
    d, L = layout.width, layout.layers
    ffn = 3072 if layout.add_norm else 11008
    counts = {name: row.trainable[layout.name] for name, row in rows.items()}
    assert counts["LoRA"] == L * 2 * 8 * (d + d)  # r (d_in + d_out) on query and value
    assert counts["PiSSA"] == counts["OLoRA"] == counts["rsLoRA"] == counts["LoRA"]  # LoRA's parameters
    assert counts["EVA"] == counts["CorDA"] == counts["LoRA-GA"] == counts["LoRA"]  # r (d_in + d_out), from data
    assert counts["LoftQ"] == counts["VeLoRA"] == counts["LoRA"]
    assert counts["MonteCLoRA"] == counts["LoRA"] + L * 2 * (8 + 8)  # LoRA's + r + N per layer
    assert counts["X-LoRA"] == d * 2 + 2  # the classifier: hidden · E + E for E = 2 experts
    assert counts["Arrow"] == 0
    if not layout.add_norm:  # one Llama layer (attention, MLP, two norms) and the final norm, then the blocks' parts
        backbone = 4 * d * d + 3 * d * ffn + 3 * d
        assert counts["ShadowPEFT"] == backbone + L * (2 * d * 8 + 2 * (2 * d * 8 + 8 + d))
    else:
        assert counts["ShadowPEFT"] is None
    assert counts["MTL-LoRA"] == L * 2 * (8 * d + 3 * d * 8 + 4 * (8 + 3))  # r·K + n·N·r + T·(r + n) on q and v
    assert counts["GaLore"] == rows["LoRA"].base_total[layout.name]  # every weight
    assert counts["QA-LoRA"] == L * 2 * 8 * (d // 16 + d)  # r (d_in / group_size + d_out) on q and v
    assert counts["MiCA"] == L * 2 * 8 * d  # r · d_in: B is frozen
    assert counts["Block-diagonal LoRA"] == L * 2 * 8 * (d + d // 4)  # r (d_in + d_out / b)
    assert counts["KaSA"] == L * 2 * 8 * (d + d + 1)  # r (d_in + d_out + 1): LoRA's and δ
    assert counts["DoRA"] == counts["LoRA"] + L * 2 * d  # plus a magnitude per output feature
    assert counts["VeRA"] == L * 2 * (256 + d)  # r + d_out per layer
    assert counts["AdaLoRA"] == L * 4 * 12 * (d + d + 1)  # r (d_in + d_out + 1) on q, k, v and o
    assert counts["DeLoRA"] == L * 2 * (8 * (d + d) + 1)  # r (d_in + d_out) + λ
    assert counts["LoHa"] == L * 2 * 2 * 8 * (d + d)  # two low-rank pairs
    assert counts["OFT"] == L * 2 * (d // 32) * (32 * 31 // 2)  # d/b blocks of b(b−1)/2
    assert counts["BOFT"] == L * 2 * (2 * (d // 8) * (8 * 7 // 2) + d)  # m · n · b(b−1)/2, plus the scale s
    assert counts["HRA"] == L * 2 * 8 * d  # r vectors of d_in
    assert counts["RoAd"] == L * 2 * d  # RoAd₁: an angle and a scale per pair of outputs
    norms = 2 * L + 1  # two per block and the embeddings' (BERT) or the final one (Llama)
    assert counts["LN tuning"] == norms * (2 * d if layout.add_norm else d)  # γ, β (LayerNorm) or γ (RMSNorm)
    assert counts["BEFT"] == L * d  # a bias per value projection
    assert counts["SHiRA"] == counts["LoRA"]  # r (d_in + d_out) entries
    assert counts["PVeRA"] == L * 2 * (2 * 256 + d)  # Λ_d (2r) and Λ_b (d_out)
    assert counts["VB-LoRA"] == 256 * 256 + L * 2 * 256 * (4 * d // 256 + d // 256 * 4)  # bank, logits per piece
    assert counts["RandLoRA"] == L * 2 * (d // 32) * (32 + d)  # n (r + d_min), n = d_min / r
    assert counts["Uni-LoRA"] == 256  # one vector for the whole model
    assert counts["TinyLoRA"] == L * 2 * 64  # u per layer (no tying)
    assert counts["Super-Tuning"] == L * 2 * int(d * d * (1 - 0.99))  # ⌊(1 − sparsity) d_out d_in⌋ per layer
    assert counts["Lily"] == 2 * (L * 32 * d + 2 * 32 * d + L * 2 * 32)  # per role: L A's, E experts, L routers
    glora_bias = 4 * (d + 1) + 2 if layout.add_norm else 0  # BERT's projections have biases, Llama's none
    assert counts["GLoRA"] == L * 2 * (2 * 4 * (d + d) + glora_bias)
    assert counts["MiSS"] == L * 2 * 64 * d  # r · d_out
    assert counts["GraLoRA"] == counts["LoRA"]  # k² blocks of rank r/k: r (d_in + d_out)
    assert counts["PEANuT"] == L * 2 * 2 * 32 * d  # A and B: 2 r d_out (depth 0)
    assert counts["FourierFT"] == L * 2 * 1000  # n coefficients per layer
    assert counts["WaveFT"] == L * 2 * 2592
    assert counts["C3A"] == L * 2 * d * d // 256  # d_out · d_in / b
    assert counts["FRoD"] == L * 2 * (d + int(d * d * 0.01))  # λ (d_in) and ⌊ρ d_in²⌋ rotational degrees
    assert counts["PSOFT"] == L * 2 * (8 * 7 // 2 + 2 * 8)  # r(r−1)/2 angles and two scalings of r
    assert counts["DEFT"] == counts["LoRA"]  # P (d_out × r) and R (r × d_in)
    assert counts["AdaMSS"] == L * 2 * (5 * 1 * 100 + 1 * d)  # K r R + r d_out
    assert counts["OSF"] == L * 2 * (d // 2) * (d + d + 1)  # (n − k)(d_out + d_in + 1), k = n/2
    assert counts["HiRA"] == counts["LoRA"]  # the same factors as LoRA, modulating W₀
    a, b = kronecker_factors(d)  # d = a·b: 768 = 24·32, 4096 = 64·64
    assert (a, b) == ((24, 32) if d == 768 else (64, 64))
    assert counts["LoKr"] == L * 2 * (a * a + (8 * (b + b) if 8 < b / 2 else b * b))  # C (a × a), W₂ = B A
    assert counts["(IA)³"] == L * (d + d + ffn)  # keys, values, the FFN's inner width
    assert counts["Houlsby adapter"] == L * 2 * (2 * d * 64 + 64 + d)
    assert counts["Adapter+"] == L * (2 * d * (d // 96) + d // 96 + 2 * d)  # 2dm + m + 2d after each FFN
    assert counts["Pfeiffer adapter"] == L * (2 * d * (d // 16) + d // 16 + d)
    assert counts["LoReFT"] == L * (2 * 4 * d + 4)  # R and W (r × d), b (r)
    assert counts["Prompt tuning"] == 20 * d
    assert counts["CPT"] == (None if layout.add_norm else 64 * d)  # n · d offsets (the labels' rows stay 0)
    kv = 2 * L * d
    assert counts["Prefix tuning"] == 10 * d + (d * 512 + 512) + (512 * kv + kv)
    assert counts["MoV"] == L * 2 * (d * 10 + 10 * d)  # a router and 10 vectors on keys and values
    assert counts["Polytropon"] == L * 2 * (4 * 8 * (d + d) + 4)  # 4 skills of rank 8, one task's logits
    if layout.add_norm:
        assert counts["MAM adapter"] is None and counts["UniPELT"] > counts["Prefix tuning"]
        assert counts["LLaMA-Adapter"] is None and rows["BitFit"].percent(layout.name) > 0
    else:
        assert counts["BitFit"] is None and counts["UniPELT"] is None
        parallel = L * (2 * d * 512 + 512 + d)
        assert counts["MAM adapter"] == 30 * d + (d * 512 + 512) + (512 * kv + kv) + parallel
        assert counts["LLaMA-Adapter"] == 30 * (10 * d + 32)  # prompts and one gate per head, top 30 layers


def test_every_row_links_to_a_module_and_says_what_it_costs(rows):
    from catalog.impls import find_impls

    from conftest import REPO

    modules = find_impls(REPO / "reference_impls")
    for row in rows.values():
        assert row.method.impl in modules, row.method.name
    assert {name for name, row in rows.items() if row.method.longer_sequence} == {
        "Prompt tuning",
        "CPT",
        "Prefix tuning",
        "LLaMA-Adapter",
        "UniPELT",
        "MAM adapter",
    }
    assert rows["LoRA"].method.merges and not rows["Houlsby adapter"].method.merges
