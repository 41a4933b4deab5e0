"""Prompt tuning, P-tuning and multitask prompt tuning against their equations and HF PEFT; and what
prompts and prefixes share (only they train, PEFT's checkpoints load, bf16)."""

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
from reference_impls.prefixes import (
    PrefixTuning,
    inject_llama_adapter,
    inject_mam,
)
from reference_impls.prompts import MultitaskPromptTuning, PromptTuning, PTuning

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


def test_demo_runs_and_every_method_learns(capsys):
    from reference_impls.prompts import demo

    demo()
    losses = demo_losses(capsys.readouterr().out)
    assert len(losses) == 3 and all(after < before - 0.3 for before, after in losses), losses
