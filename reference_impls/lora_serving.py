"""LoRA shaped for serving: Activated LoRA (the adapter acts only from an invocation onwards, so the
base model's cache of everything before it is reused).

**Activated LoRA.** Greenewald, Lastras, Parnell, et al. "Activated LoRA: Fine-tuned LLMs for
Intrinsics." 2025. arXiv:2504.12397. A conversation runs on the base model; to call a specialised
adapter (an "intrinsic") on it, one appends an invocation sequence of tokens. The adapter's update
applies only to the positions from the last occurrence of that sequence onwards:

    h_t = W₀ x_t + b + [t ≥ t₀] · s·B A x_t,        t₀ = where the last invocation starts

so every earlier position computes exactly what the base model computed, and its key/value cache can
be reused instead of recomputed under the adapter. A row without the invocation is the base model.
Trainable parameters: LoRA's, r (d_in + d_out) per layer; it does not merge (the update depends on
the position).

Equal to PEFT 0.21's LoRA with `alora_invocation_tokens`; `reference_impls.interop` loads such
checkpoints, returning an `ActivatedLoRA` wrapper that finds the invocation in each input.
"""

import torch
from torch import nn
from torch.nn import functional as F

from reference_impls._plumbing import find_targets, freeze_all_but, replace_module, setting
from reference_impls.lora import LoRALinear

FAMILY = "Low-rank updates"

IMPLEMENTS = ("activated-lora",)

# The frameworks that provide the method.
COVERED_BY = ("hf-peft",)


def invocation_starts(input_ids: torch.Tensor, invocation: list[int]) -> list[int | None]:
    """For each row, where the last occurrence of the invocation sequence starts (None where it is absent)."""
    sequence = torch.tensor(invocation, device=input_ids.device)
    windows = input_ids.unfold(1, len(invocation), 1)  # (batch, positions, len(invocation))
    found = (windows == sequence).all(dim=-1)
    return [int(row.nonzero().max()) if row.any() else None for row in found]


class ActivatedLoRALinear(LoRALinear):
    """LoRA whose update reaches only the positions at or after each row's `start` (set per batch)."""

    starts: torch.Tensor | None = None  # (batch,): the first adapted position, = length where none

    def takes_kernel(self, x: torch.Tensor) -> bool:
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.starts is None:  # no invocation in sight: the base model
            return h
        active = torch.arange(x.shape[1], device=x.device)[None, :] >= self.starts[:, None]  # (batch, tokens)
        update = F.linear(F.linear(self.dropout(x[active]).to(self.A.dtype), self.A), self.B)
        h = h.clone()
        h[active] += (self.scale * update).to(h.dtype)
        return h

    def merge(self) -> None:
        raise ValueError("Activated LoRA does not merge: its update depends on the position")


class ActivatedLoRA(nn.Module):
    """A model with ActivatedLoRALinear layers, told for each input where its invocation starts."""

    def __init__(self, model: nn.Module, invocation: list[int]):
        super().__init__()
        if not invocation:
            raise ValueError("Activated LoRA needs a non-empty invocation sequence")
        self.model, self.invocation = model, list(invocation)

    def forward(self, input_ids: torch.Tensor, **kwargs):
        length = input_ids.shape[1]
        found = invocation_starts(input_ids, self.invocation)
        starts = torch.tensor([length if start is None else start for start in found], device=input_ids.device)
        with setting(self.model, ActivatedLoRALinear, "starts", starts):
            return self.model(input_ids=input_ids, **kwargs)


def inject_activated_lora(
    model: nn.Module, target_names: list[str], invocation: list[int], r: int = 8, alpha: float = 16.0, dropout=0.0
) -> ActivatedLoRA:
    """Activated LoRA on the named layers; returns the wrapper to call (it finds each input's invocation)."""
    for name in find_targets(model, target_names):
        replace_module(model, name, ActivatedLoRALinear(model.get_submodule(name), r, alpha, dropout))
    freeze_all_but(model, ActivatedLoRALinear, ("A", "B"))
    return ActivatedLoRA(model, invocation)


def demo() -> None:
    """Teach a tiny causal LM to answer token 5 everywhere after the invocation [7, 7], while every
    position before it computes exactly what the base model computes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4
    )
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(8, 32, (64, 12), generator=generator)
    ids[:, 5:7] = 7  # the invocation, in the middle of every row
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
    adapted = inject_activated_lora(model, ["q_proj", "v_proj", "down_proj"], invocation=[7, 7], r=4, alpha=8)
    targets = torch.full((64, 6), 5)
    optimizer = torch.optim.Adam([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    loss = lambda: F.cross_entropy(adapted(ids).logits[:, 6:].reshape(-1, 32), targets.reshape(-1))  # noqa: E731
    with torch.no_grad():
        start = loss().item()
    for _ in range(60):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        before = (adapted(ids).logits[:, :5] - base_logits[:, :5]).abs().max().item()
    print(f"activated lora: before the invocation the logits differ from the base model's by {before:.1e}")
    print(f"loss on the new task: {start:.4g} before, {loss().item():.4g} after training")


if __name__ == "__main__":
    demo()
