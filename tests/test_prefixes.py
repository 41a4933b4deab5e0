"""Prefix tuning / P-tuning v2, cartridges (and their self-study), LLaMA-Adapter, the MAM adapter and
an encoder's prefixes against their equations, HF PEFT and AdapterHub."""

import copy

import pytest
import torch
from peft import (
    AdaptionPromptConfig,
    PrefixTuningConfig,
    get_peft_model,
)
from test_interop import tiny_llama
from test_prompts import IDS, N, peft_prompt_model

from reference_impls._plumbing import count_parameters
from reference_impls.interop import load_peft_adapter
from reference_impls.prefixes import (
    AdaptedAttention,
    Cartridge,
    PrefixTuning,
    inject_llama_adapter,
    inject_mam,
)

from helpers import demo_losses


def test_a_cartridge_started_from_a_text_is_that_text_in_the_cache():
    """The model reading [text; rest] and the model reading rest after the cartridge of text's first
    n tokens give the same logits for rest; the packing is PEFT's; frozen positions do not train."""
    from peft.tuners.cartridge.utils import prompt_embeddings_from_past_key_values

    torch.manual_seed(0)
    model = tiny_llama().eval()
    text = torch.randint(0, 97, (12,))
    cartridge = Cartridge(model, n=N, frozen=2).eval()
    cartridge.start_from(text)
    with torch.no_grad():
        whole = model(input_ids=text[None]).logits[:, N:]
        torch.testing.assert_close(cartridge(input_ids=text[None, N:]).logits, whole, rtol=1e-5, atol=1e-5)
        cache = model(input_ids=text[None, :N], use_cache=True).past_key_values
        torch.testing.assert_close(
            cartridge.prefix(), prompt_embeddings_from_past_key_values(cache, num_virtual_tokens=N)
        )
    width = 2 * 2 * 2 * 8  # 2 layers × (keys, values) × 2 key-value heads × head_dim 8
    assert count_parameters(cartridge)[0] == (N - 2) * width
    with pytest.raises(ValueError, match="at least"):
        cartridge.start_from(text[:3])


def test_self_study_distils_the_corpus_into_the_cartridge():
    """The loss is 0 when the cartridge is the whole corpus's cache, positive when it holds only its
    start, and training the cartridge on it brings the model reading the cartridge nearer the model
    reading the corpus."""
    torch.manual_seed(1)
    model = tiny_llama().eval()
    with torch.no_grad():  # larger weights than the initialisation's, so that the context matters
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.mul_(10)
    corpus, queries = torch.randint(0, 97, (16,)), torch.randint(0, 97, (6, 7))
    whole = Cartridge(model, n=16).eval()
    whole.start_from(corpus)
    with torch.no_grad():
        assert whole.self_study_loss(corpus, queries).item() < 1e-6
    cartridge = Cartridge(model, n=N, frozen=1).eval()
    cartridge.start_from(corpus)  # its first N tokens only
    before = cartridge.self_study_loss(corpus, queries).item()
    optimiser = torch.optim.Adam([cartridge.prefix_input], lr=0.1)
    for _ in range(40):
        optimiser.zero_grad()
        cartridge.self_study_loss(corpus, torch.randint(0, 97, (6, 7))).backward()
        optimiser.step()
    with torch.no_grad():
        after = cartridge.self_study_loss(corpus, queries).item()
    assert before > 1e-3 and after < 0.6 * before  # 0.78 → 0.41 here


def test_a_peft_cartridge_checkpoint_loads_as_a_prefix(tmp_path):
    from peft import CartridgeConfig

    theirs, base = peft_prompt_model(CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, num_frozen_tokens=1))
    with torch.no_grad():
        theirs.prompt_encoder["default"].trainable_embedding.normal_(0, 0.5)
    theirs.save_pretrained(tmp_path)
    ours = load_peft_adapter(base, tmp_path)
    ids = IDS()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        assert (expected - tiny_llama()(input_ids=ids).logits).abs().max() > 1e-2
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_equals_peft(projection):
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=projection, encoder_hidden_size=16
    )
    theirs, base = peft_prompt_model(config)
    encoder = theirs.prompt_encoder["default"]
    ours = PrefixTuning(base, n=N, hidden=16 if projection else None).eval()
    with torch.no_grad():
        encoder.embedding.weight.normal_(0, 0.5)
        ours.prefix_input.copy_(encoder.embedding.weight)
        if projection:
            for mine, peft_layer in ((ours.mlp[0], encoder.transform[0]), (ours.mlp[2], encoder.transform[2])):
                mine.weight.copy_(peft_layer.weight)
                mine.bias.copy_(peft_layer.bias)
    theirs.train(False)
    ids = IDS()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        got = ours(input_ids=ids).logits
        plain = tiny_llama()(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_prefix_parameter_counts_and_freezing_the_mlp_keeps_outputs():
    width = 2 * 2 * 2 * 8  # 2·L·d_kv: keys and values, 2 layers, 2 kv heads of 8
    assert count_parameters(PrefixTuning(tiny_llama(), n=N, hidden=None))[0] == N * width  # P-tuning v2
    model = PrefixTuning(tiny_llama(), n=N, hidden=16)
    assert count_parameters(model)[0] == N * 16 + (16 * 16 + 16) + (16 * width + width)  # P' has d_kv = 16
    ids = IDS()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model.freeze_prefix()
        torch.testing.assert_close(model(input_ids=ids).logits, before)
    assert model.mlp is None and count_parameters(model)[0] == N * width


def test_llama_adapter_is_identity_at_start_and_equals_peft():
    base = tiny_llama()
    reference = copy.deepcopy(base)
    ours = inject_llama_adapter(copy.deepcopy(base), n=4, top_layers=2)
    ids = IDS()
    torch.testing.assert_close(ours(input_ids=ids).logits, reference(input_ids=ids).logits)  # zero gates
    assert count_parameters(ours)[0] == 2 * (4 * 32 + 4)  # L · (n·d + heads)

    theirs = get_peft_model(
        copy.deepcopy(base), AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=2)
    ).eval()
    with torch.no_grad():
        for index in range(2):
            peft_attention = theirs.base_model.model.model.layers[index].self_attn
            peft_attention.adaption_prompt.normal_()
            peft_attention.adaption_gate.fill_(0.7 + index)
            mine = ours.model.layers[index].self_attn
            assert isinstance(mine, AdaptedAttention)
            mine.prompt.copy_(peft_attention.adaption_prompt[0])
            mine.gate.fill_(0.7 + index)
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        got = ours(input_ids=ids).logits
    assert (expected - reference(input_ids=ids).logits).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_mam_is_prefix_tuning_plus_a_scaled_parallel_adapter_beside_each_ffn():
    """He et al.'s MAM: the prefix on attention, FFN(x) + 4 · (W_up ReLU(W_down x + b_down) + b_up) beside
    every FFN; the count is the prefix's plus L · (2dm + d + m); only those are trained."""
    d, L, d_kv, m, hidden = 32, 2, 16, 6, 16
    mam = inject_mam(tiny_llama(), n=N, hidden=hidden, m=m).eval()
    prefix = N * d_kv + (d_kv * hidden + hidden) + (hidden * 2 * L * d_kv + 2 * L * d_kv)
    assert count_parameters(mam)[0] == prefix + L * (2 * d * m + d + m)
    ids = IDS()
    # The equation, on a fresh copy of the same model: the same prefix, the adapters as forward hooks.
    reference = PrefixTuning(tiny_llama(), n=N, hidden=hidden).eval()
    reference.load_state_dict(
        {name: value for name, value in mam.state_dict().items() if name.startswith(("prefix_input", "mlp."))},
        strict=False,
    )
    torch.testing.assert_close(mam(input_ids=ids).logits, reference(input_ids=ids).logits)  # adapters start at 0
    adapters = []
    for layer, theirs in zip(mam.model.model.layers, reference.model.model.layers):
        adapter = layer.mlp.adapter
        with torch.no_grad():
            for parameter in adapter.parameters():
                parameter.normal_(0, 0.3)
        adapters.append(adapter)
        theirs.mlp.register_forward_hook(
            lambda module, args, out, a=adapter: (
                out + 4 * (torch.relu(args[0] @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias)
            )
        )
    torch.testing.assert_close(mam(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    mam.train()
    mam(input_ids=ids).logits.sum().backward()
    trained = {name for name, parameter in mam.named_parameters() if parameter.grad is not None}
    assert trained == {name for name, parameter in mam.named_parameters() if parameter.requires_grad}
    assert any(".adapter.up." in name for name in trained) and "prefix_input" in trained


def test_encoder_prefix_tuning_equals_adapterhub_on_a_tiny_bert():
    """Prefix tuning inside BERT's self-attention (positions unshifted, padding masked), against
    AdapterHub's PrefixTuningConfig with the same table and MLP."""
    import adapters
    from adapters import PrefixTuningConfig

    from reference_impls.prefixes import inject_encoder_prefix

    from helpers import copy_adapterhub_prefix, tiny_bert

    base = tiny_bert()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    adapters.init(theirs)
    theirs.add_adapter("task", config=PrefixTuningConfig(prefix_length=5, bottleneck_size=24))
    theirs.set_active_adapters("task")
    prefixes = inject_encoder_prefix(ours, n=5, hidden=24)
    hub = theirs.encoder.layer[0].attention.self.prefix_tuning.pool.prefix_tunings["task"].self_prefix
    with torch.no_grad():
        for parameter in hub.parameters():
            parameter.normal_(0, 0.5)
        copy_adapterhub_prefix(prefixes, hub)
    ids = torch.randint(0, 99, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0  # padding
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        plain = base(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (expected - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert [name for name, p in ours.named_parameters() if p.requires_grad] == [
        "prefixes.prefix_input",
        "prefixes.mlp.0.weight",
        "prefixes.mlp.0.bias",
        "prefixes.mlp.2.weight",
        "prefixes.mlp.2.bias",
    ]


def test_demo_runs_and_every_method_learns(capsys):
    from reference_impls.prefixes import demo

    demo()
    losses = demo_losses(capsys.readouterr().out)
    assert len(losses) == 5 and all(after < before - 0.3 for before, after in losses), losses
