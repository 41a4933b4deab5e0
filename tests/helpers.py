"""Checks that several test modules share."""

import copy
import re

import torch

LOSSES = re.compile(r"loss on the new task: ([\d.e+-]+) before, ([\d.e+-]+) after")


def demo_losses(output: str) -> list[tuple[float, float]]:
    """(before, after) for every 'loss on the new task' line a demo printed."""
    return [(float(before), float(after)) for before, after in LOSSES.findall(output)]


def spy(monkeypatch, module, name: str) -> list:
    """Record every call of module.name (which still runs): the kernel tests' proof of the path taken."""
    calls, original = [], getattr(module, name)

    def recorded(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, recorded)
    return calls


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


def assert_merge_round_trip(model, merge, unmerge, x, rtol=1e-5, atol=1e-5, weight_rtol=1e-6, weight_atol=1e-6):
    """Merged output equals unmerged output, and unmerging restores every weight."""
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    unmerged = model(x)
    merge(model)
    torch.testing.assert_close(model(x), unmerged, rtol=rtol, atol=atol)
    unmerge(model)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter, weights[name], rtol=weight_rtol, atol=weight_atol)


def peft_and_ours(make_model, config, directory, std: float = 0.3, positive: tuple[str, ...] = ()):
    """PEFT's model of `config` on make_model(), every trainable tensor drawn non-zero (N(0, std²), or
    U(0.5, 1.5) where the name holds one of `positive`: scales that must stay away from 0) and saved with
    save_pretrained; and ours, that checkpoint loaded by load_peft_adapter onto an untouched copy of the base.
    Both come back in evaluation mode."""
    from peft import get_peft_model

    from reference_impls.interop import load_peft_adapter

    base = make_model()
    fresh = copy.deepcopy(base)
    theirs = get_peft_model(base, copy.deepcopy(config))
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if parameter.requires_grad:
                parameter.uniform_(0.5, 1.5) if any(part in name for part in positive) else parameter.normal_(0, std)
    theirs.save_pretrained(directory)
    return theirs.eval(), load_peft_adapter(fresh, directory).eval()


def assert_equal_in_both_dtypes(ours, theirs, x, dtype, tolerance: float):
    """PEFT's output moves away from its base model's; ours equals it in fp32 (relative error ≤ 1e-5) and,
    both models cast to `dtype`, within `tolerance`. Casts the models in place."""
    with torch.no_grad():
        expected = theirs(x)
        with theirs.disable_adapter():
            assert (expected - theirs(x)).abs().max() > 1e-2
        assert relative_error(ours(x), expected) <= 1e-5
        ours, theirs = ours.to(dtype), theirs.to(dtype)
        assert relative_error(ours(x.to(dtype)), theirs(x.to(dtype))) <= tolerance


def tiny_bert(hidden: int = 32, intermediate: int = 37):
    """A small random BERT (two layers, four heads), built from a config: nothing is downloaded."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(
        BertConfig(
            vocab_size=99,
            hidden_size=hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=intermediate,
            max_position_embeddings=40,
        )
    ).eval()


def assert_same_encoding(ours, theirs, base, length: int = 9):
    """Both adapted models give the same hidden states, and the adapters really change them."""
    ids = torch.randint(0, 99, (2, length))
    with torch.no_grad():
        expected, got = theirs(input_ids=ids).last_hidden_state, ours(input_ids=ids).last_hidden_state
        plain = base(input_ids=ids).last_hidden_state
    assert (expected - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def run_demo(module: str) -> str:
    """Run `python -m <module>` as a user would and return what it printed. For the kernel modules on a
    CPU that means their PyTorch twins: in the test process the interpreter would run the kernels,
    far too slowly for a demo's hundreds of training steps."""
    import os
    import subprocess
    import sys

    from repo_inputs import REPO

    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", module],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO,
        check=True,
        timeout=300,
    ).stdout


def copy_adapterhub_prefix(prefixes, hub_prefix) -> None:
    """Our prefixes (prefixes.Prefixes) from AdapterHub's prefix-tuning module: its table and MLP."""
    with torch.no_grad():
        prefixes.prefix_input.copy_(hub_prefix.wte.weight)
        prefixes.mlp[0].load_state_dict(hub_prefix.control_trans[0].state_dict())
        prefixes.mlp[2].load_state_dict(hub_prefix.control_trans[2].state_dict())
