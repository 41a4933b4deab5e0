"""Prompt tuning, P-tuning, multitask prompt tuning, prefix tuning / P-tuning v2, cartridges and
LLaMA-Adapter against their equations and HF PEFT."""

import copy

import pytest
import torch
from peft import (
    AdaptionPromptConfig,
    MultitaskPromptTuningConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from test_interop import tiny_llama

from reference_impls._plumbing import count_parameters
from reference_impls.interop import load_peft_adapter
from reference_impls.prompts import (
    AdaptedAttention,
    Cartridge,
    MultitaskPromptTuning,
    PrefixTuning,
    PromptTuning,
    PTuning,
    inject_llama_adapter,
    inject_mam,
)

from helpers import demo_losses

N = 5
IDS = lambda: torch.randint(0, 97, (2, 9))  # fresh tokens each call


def peft_prompt_model(config):
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    return get_peft_model(base, config).eval(), fresh


def test_prompt_tuning_equals_peft_and_counts_n_times_d():
    theirs, base = peft_prompt_model(PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    ours = PromptTuning(base, n=N).eval()
    with torch.no_grad():
        ours.prompt.copy_(theirs.prompt_encoder["default"].embedding.weight)
    ids = IDS()
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert count_parameters(ours)[0] == N * 32
    assert ours(input_ids=ids).logits.shape[1] == N + ids.shape[1]


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_p_tuning_equals_peft_and_its_checkpoint_serves_as_prompt_tuning(encoder, tmp_path):
    config = PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=12, encoder_reparameterization_type=encoder
    )
    theirs, base = peft_prompt_model(config)
    ours = PTuning(base, n=N, hidden=12, encoder=encoder).eval()
    theirs_encoder = theirs.prompt_encoder["default"]
    with torch.no_grad():
        ours.prompt_input.copy_(theirs_encoder.embedding.weight)
        ours.mlp.load_state_dict(theirs_encoder.mlp_head.state_dict())
        if encoder == "LSTM":
            ours.lstm.load_state_dict(theirs_encoder.lstm_head.state_dict())
    ids = IDS()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        assert (expected[:, N:] - tiny_llama()(input_ids=ids).logits).abs().max() > 1e-2
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.freeze_prompt()(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    d, h = 32, 12
    head = (d * h + h + h * h + h + h * d + d) if encoder == "MLP" else (2 * h * 2 * h + 2 * h + 2 * h * d + d)
    lstm = 0 if encoder == "MLP" else sum(p.numel() for p in ours.lstm.parameters())
    assert count_parameters(ours)[0] == N * d + head + lstm
    theirs.save_pretrained(tmp_path)  # PEFT saves the encoder's output: P itself
    loaded = load_peft_adapter(tiny_llama(), tmp_path)
    assert type(loaded) is PromptTuning
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ranks", [1, 2])
def test_multitask_prompt_tuning_equals_peft_per_task_and_loads_its_checkpoint(ranks, tmp_path):
    config = MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, num_tasks=3, num_ranks=ranks)
    theirs, base = peft_prompt_model(config)
    encoder = theirs.prompt_encoder["default"]
    with torch.no_grad():
        for parameter in (encoder.prefix_task_cols, encoder.prefix_task_rows):
            parameter.normal_()  # far from their 0.02 start, so that the tasks' prompts differ clearly
    theirs.save_pretrained(tmp_path)
    ours = load_peft_adapter(base, tmp_path)
    assert type(ours) is MultitaskPromptTuning
    ids, task_ids = IDS(), torch.tensor([2, 0])
    with torch.no_grad():
        expected = theirs(input_ids=ids, task_ids=task_ids).logits
        got = ours(input_ids=ids, task_ids=task_ids).logits
        other_tasks = ours(input_ids=ids, task_ids=torch.tensor([1, 1])).logits
        prompt = ours.prompts(task_ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (other_tasks - got).abs().max() > 1e-2  # each task its own prompt
    for row, task in enumerate(task_ids):  # P_k = P* ⊙ (U_k V_k)
        torch.testing.assert_close(prompt[row], ours.prompt * (ours.U[task] @ ours.V[task]))
    assert count_parameters(MultitaskPromptTuning(tiny_llama(), n=N, tasks=3, r=ranks))[0] == N * 32 + 3 * ranks * (
        N + 32
    )


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


def test_only_prompts_are_trainable():
    for model in (
        PromptTuning(tiny_llama(), n=3),
        PrefixTuning(tiny_llama(), n=3, hidden=8),
        inject_llama_adapter(tiny_llama(), n=3, top_layers=1),
    ):
        names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
        assert names and all(any(key in name for key in ("prompt", "prefix", "mlp", "gate")) for name in names), names


@pytest.mark.parametrize(
    "config",
    [
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=16),
        AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=2),
    ],
    ids=["prompt", "prefix", "prefix_projection", "adaption_prompt"],
)
def test_peft_prompt_checkpoints_load_through_interop(config, tmp_path):
    theirs, base = peft_prompt_model(config)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.5) if "gate" not in name else parameter.fill_(0.9)
    theirs.save_pretrained(tmp_path)
    ours = load_peft_adapter(base, tmp_path)
    ids = IDS()
    with torch.no_grad():
        expected, got = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
    relative = ((got - expected).norm() / expected.norm()).item()
    assert relative <= 1e-5, relative


def test_demo_runs_and_every_method_learns(capsys):
    from reference_impls.prompts import demo

    demo()
    losses = demo_losses(capsys.readouterr().out)
    assert len(losses) == 8 and all(after < before - 0.3 for before, after in losses), losses


def test_bf16_matches_fp32():
    for make in (
        lambda m: PromptTuning(m, n=3),
        lambda m: PrefixTuning(m, n=3, hidden=None),
        lambda m: inject_llama_adapter(m, n=3, top_layers=2),
        lambda m: inject_mam(m, n=3, hidden=None, m=4),
    ):
        model = make(tiny_llama()).eval()
        with torch.no_grad():
            for _name, parameter in model.named_parameters():
                if parameter.requires_grad:
                    parameter.normal_(0, 0.5)
        ids = IDS()
        with torch.no_grad():
            expected = model(input_ids=ids).logits
            got = copy.deepcopy(model).to(torch.bfloat16)(input_ids=ids).logits.float()
        assert ((got - expected).norm() / expected.norm()).item() < 3e-2


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

    from reference_impls.prompts import inject_encoder_prefix

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
