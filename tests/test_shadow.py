"""ShadowPEFT against its definition (the injection and the gated update, identity at the start, the
auxiliary loss) and against HF PEFT's `ShadowConfig`: its checkpoints load and give its logits and
losses, in evaluation and in training with the same seed."""

import copy

import pytest
import torch
from peft import PeftModel
from peft.tuners.shadow import ShadowConfig
from test_interop import save_with_nonzero_weights, tiny_llama

from reference_impls._plumbing import count_parameters
from reference_impls.interop import UnsupportedAdapter, load_peft_adapter
from reference_impls.shadow import ShadowBlock, ShadowPEFT

from helpers import demo_losses, relative_error, run_demo

CASES = {
    "default": {},
    "narrow deep shadow": {
        "shadow_num_hidden_layers": 2,
        "shadow_hidden_size": 16,
        "shadow_num_attention_heads": 2,
        "shadow_intermediate_size": 24,
        "update_hidden_size": 6,
    },  # fmt: skip
    "own embeddings": {"share_embeddings": False, "shadow_alpha": 0.5, "auxiliary_loss_weight": 0.3},
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_peft_checkpoint_gives_peft_s_logits_and_losses(case, tmp_path):
    config = ShadowConfig(r=4, task_type="CAUSAL_LM", **CASES[case])
    theirs, fresh = save_with_nonzero_weights(tiny_llama, config, tmp_path)
    ours = load_peft_adapter(fresh, tmp_path)
    assert isinstance(ours, ShadowPEFT)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        expected = theirs(input_ids=ids, labels=ids)
        got = ours(input_ids=ids, labels=ids)
        assert relative_error(got.logits, expected.logits) <= 1e-5
        assert got.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)  # task + λ · shadow loss
        reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
        assert relative_error(reloaded(input_ids=ids).logits, expected.logits) <= 1e-6
    ours.train(), theirs.train()  # the gap's dropout, with the same seed
    torch.manual_seed(3)
    dropped = theirs(input_ids=ids).logits
    torch.manual_seed(3)
    assert relative_error(ours(input_ids=ids).logits, dropped) <= 1e-5
    assert relative_error(dropped, expected.logits) > 1e-4


def test_the_shadow_starts_as_the_base_model_counts_and_trains_only_itself():
    base = tiny_llama()
    model = ShadowPEFT(copy.deepcopy(base), r=4, update_hidden=6)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)  # W_up = 0
    d, r, u, L = 32, 4, 6, 2
    backbone = sum(p.numel() for p in model.backbone.parameters())  # one Llama layer and its norm, no embeddings
    assert backbone == 2 * 32 * 32 + 2 * 16 * 32 + 3 * 32 * 44 + 3 * 32
    assert count_parameters(model)[0] == backbone + L * (2 * d * r + 2 * (2 * d * u + u + d))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(n.startswith("backbone.") or ".layers." in n and "block" not in n for n in trained)


def test_the_auxiliary_loss_is_the_shadow_s_own_next_token_loss():
    model = ShadowPEFT(tiny_llama(), r=4, auxiliary_weight=0.25)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        plain = model.model(input_ids=ids, labels=ids)  # no shadow state: the base model's loss... with W_up = 0
        logits = model.model.lm_head(model.initial_state)
        shadow = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert out.shadow_loss.item() == pytest.approx(shadow.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(plain.loss.item() + 0.25 * shadow.item(), rel=1e-5)


def test_a_checkpoint_on_some_blocks_only_is_refused_and_the_model_is_left_alone(tmp_path):
    save_with_nonzero_weights(tiny_llama, ShadowConfig(r=4, task_type="CAUSAL_LM", target_modules=["model.layers.0"]),
                              tmp_path)  # fmt: skip
    model = tiny_llama()
    with pytest.raises(UnsupportedAdapter, match="must wrap them all"):
        load_peft_adapter(model, tmp_path)
    assert not any(isinstance(m, ShadowBlock) for m in model.modules())


def test_demo_learns():
    ((before, after),) = demo_losses(run_demo("reference_impls.shadow"))
    assert after < before / 10
