"""MonteCLoRA against its definition (LoRA at evaluation, the perturbation's mixture on the same draws,
the KL terms) and against HF PEFT's `MontecloraConfig`: its checkpoints load and give its logits;
in training, on the same standard draws (PEFT's buffer copied), the same outputs and gradients; its
regulariser's Wishart and Gaussian terms, and its Dirichlet term's departure from the KL."""

import copy

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.config import MontecloraConfig
from peft.tuners.lora.monteclora import MontecloraSampler
from test_interop import save_with_nonzero_weights, tiny_llama
from test_lora import Tiny
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.interop import load_peft_adapter
from reference_impls.lora import merge_lora, unmerge_lora
from reference_impls.lora_bayesian import MonteCLoRALinear, inject_monteclora, monteclora_penalty, wishart_sample

from helpers import assert_merge_round_trip, demo_losses, relative_error, run_demo

OPTIONS = {"num_samples": 3, "sample_scaler": 0.05, "buffer_size": 4, "dirichlet_prior": 0.3, "kl_loss_weight": 1e-2}


def loaded_pair(tmp_path, use_entropy=False):
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "down_proj"],
        monteclora_config=MontecloraConfig(**OPTIONS, use_entropy=use_entropy),
    )
    theirs, fresh = save_with_nonzero_weights(tiny_llama, config, tmp_path)
    return load_peft_adapter(fresh, tmp_path), theirs


def their_layers(theirs):
    return {n: m for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_monteclora_sampler")}


def copy_draws(ours, theirs):
    """Our layers take PEFT's pending standard draws, in its order."""
    for name, their in their_layers(theirs).items():
        sampler = their.lora_monteclora_sampler["default"].sampler
        pending = sampler.buffer[sampler.index :]
        ours.get_submodule(name).draws = [
            {"z": d["z_mvn"].clone(), "W": d["z_wishart"].clone(), "zeta": d["z_dirichlet"].clone()} for d in pending
        ]


def test_a_checkpoint_gives_peft_s_logits_at_evaluation(tmp_path):
    ours, theirs = loaded_pair(tmp_path)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert relative_error(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) <= 1e-5
    assert isinstance(ours.model.layers[0].self_attn.q_proj, MonteCLoRALinear)


@pytest.mark.parametrize("use_entropy", [False, True])
def test_training_steps_on_the_same_draws_are_peft_s(use_entropy, tmp_path):
    ours, theirs = loaded_pair(tmp_path, use_entropy)
    for name, parameter in ours.named_parameters():
        parameter.requires_grad_(name.rsplit(".", 1)[-1] in ("A", "B", "log_std", "log_concentration"))
    ours.train(), theirs.train()
    copy_draws(ours, theirs)
    for _ in range(3):  # three draws of the buffer
        ids = torch.randint(0, 97, (2, 9))
        expected = theirs(input_ids=ids, labels=ids)
        got = ours(input_ids=ids, labels=ids)
        assert relative_error(got.logits, expected.logits) <= 1e-5
        layers = [m for m in ours.modules() if isinstance(m, MonteCLoRALinear)]
        for layer, their in zip(layers, their_layers(theirs).values()):
            sampler = their.lora_monteclora_sampler["default"]
            torch.testing.assert_close(layer.variance, sampler.gaussian_var_prior)
            torch.testing.assert_close(layer.mixture, sampler.expert_weights)
        (got.loss + monteclora_penalty(ours)).backward()
        (expected.loss + theirs.base_model._get_monteclora_loss()).backward()
        first, their_first = layers[0], next(iter(their_layers(theirs).values()))
        assert relative_error(first.A.grad, their_first.lora_A["default"].weight.grad) <= 1e-4
        ours.zero_grad(), theirs.zero_grad()


def test_the_wishart_and_gaussian_terms_are_peft_s_and_the_dirichlet_one_is_the_kl():
    layer = MonteCLoRALinear(nn.Linear(6, 5), r=3, samples=4, dirichlet_prior=0.3, kl_weight=1.0).train()
    sampler = MontecloraSampler(6, 3, 4, dirichlet_prior=0.3, kl_loss_weight=1.0, buffer_size=1, device="cpu")
    with torch.no_grad():
        layer.log_std.normal_(), layer.log_concentration.normal_()
        sampler.std_prior.copy_(layer.log_std), sampler.expert_weights_prior.copy_(layer.log_concentration)
        layer.perturbation()
        sampler.gaussian_var_prior = layer.variance.clone()
    a = layer.log_concentration.exp()
    wishart = sampler.wishart_kl(torch.diag(layer.log_std.exp()))
    gaussian = sampler.multivariate_kl(layer.variance)
    true_kl = torch.distributions.kl_divergence(
        torch.distributions.Dirichlet(a), torch.distributions.Dirichlet(torch.full((4,), 0.3))
    )
    assert layer.variational_loss().item() == pytest.approx((true_kl + wishart + gaussian).item(), rel=1e-5)
    lgamma_gap = torch.lgamma(a).sum() - torch.lgamma(torch.full((4,), 0.3)).sum()
    assert sampler.dirichlet_kl(a).item() == pytest.approx((true_kl + 2 * lgamma_gap).item(), rel=1e-4, abs=1e-5)
    assert layer.eval().variational_loss().item() == 0


def test_evaluation_is_lora_counts_and_merges():
    plain = Tiny()
    model = copy.deepcopy(plain)
    inject_monteclora(model, ["up", "down"], r=3, alpha=6, samples=5)
    assert count_parameters(model)[0] == 3 * (13 + 29) + 3 * (29 + 7) + 2 * (3 + 5)  # LoRA's + r + N per layer
    for layer in (model.up, model.down):
        with torch.no_grad():
            layer.B.normal_()
    x = torch.randn(4, 13)
    model.eval()
    assert_merge_round_trip(model, merge_lora, unmerge_lora, x)
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(x), model.eval()(x))  # sampled while training


def test_the_perturbation_is_the_mixture_of_the_scaled_gaussian_draws():
    layer = MonteCLoRALinear(nn.Linear(6, 5), r=3, samples=4, sample_scale=0.1).train()
    draws = {"z": torch.randn(4, 6, 3), "W": wishart_sample(3), "zeta": torch.randn(4)}
    layer.draws = [draws]
    with torch.no_grad():
        delta = layer.perturbation()
    root = layer.variance.diagonal().sqrt()
    expected = sum(layer.mixture[n] * (0.1 * draws["z"][n] * root).T for n in range(4))
    torch.testing.assert_close(delta, expected)
    assert layer.mixture.sum().item() == pytest.approx(1.0)
    samples = torch.stack([wishart_sample(3) for _ in range(4000)])
    torch.testing.assert_close(samples.mean(0), 3 * torch.eye(3), atol=0.15, rtol=0)  # E[W] = p · I


def test_demo_learns():
    ((before, after),) = demo_losses(run_demo("reference_impls.lora_bayesian"))
    assert after < before / 20
