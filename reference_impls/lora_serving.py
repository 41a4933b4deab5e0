"""LoRA shaped for serving: Activated LoRA (the adapter acts only from an invocation onwards, so the
base model's cache of everything before it is reused) and Block-diagonal LoRA (factors aligned with
tensor-parallel shards, so serving the adapter needs no communication of its own).

**Activated LoRA.** Greenewald, Lastras, Parnell, et al. "Activated LoRA: Fine-tuned LLMs for
Intrinsics." 2025. arXiv:2504.12397. A conversation runs on the base model; to call a specialised
adapter (an "intrinsic") on it, one appends an invocation sequence of tokens. The adapter's update
applies only to the positions from the last occurrence of that sequence onwards:

    h_t = W₀ x_t + b + [t ≥ t₀] · s·B A x_t,        t₀ = where the last invocation starts

so every earlier position computes exactly what the base model computed, and its key/value cache can
be reused instead of recomputed under the adapter. A row without the invocation is the base model.
Trainable parameters: LoRA's, r (d_in + d_out) per layer; it does not merge (the update depends on
the position).

**Block-diagonal LoRA.** "Block-Diagonal LoRA for Eliminating Communication Overhead in Tensor
Parallel LoRA Serving." 2025. arXiv:2510.23346. Served with tensor parallelism over b devices, a
column-parallel layer (Q, K, V, up, gate) splits W's rows, a row-parallel one (out, down) its
columns and sums the shards' outputs. LoRA's BA then needs communication of its own (A x gathered
before B) — unless one factor is block-diagonal over the same b shards:

    column-parallel:  B = diag(B₁ … B_b),  shard i computes W_i x + s·B_i (A_i x)     (A_i: its r/b rows of A)
    row-parallel:     A = diag(A₁ … A_b),  shard i computes W_i x_i + s·B_{:,i} (A_i x_i), summed as W x is

so each shard needs only its own slice (`shard_outputs` shows it). Trainable parameters: r (d_in +
d_out / b) with B block-diagonal, r (d_in / b + d_out) with A; it merges as LoRA does.

Both equal PEFT 0.21's LoRA with `alora_invocation_tokens` and with `use_bdlora`;
`reference_impls.interop` loads their checkpoints (Activated LoRA as an `ActivatedLoRA` wrapper that
finds the invocation in each input).
"""

import torch
from torch import nn
from torch.nn import functional as F

from reference_impls._plumbing import (
    find_targets,
    freeze_all_but,
    replace_module,
    report,
    setting,
    toy_model,
    toy_task,
    train,
)
from reference_impls.lora import LoRALinear

FAMILY = "Low-rank updates"

IMPLEMENTS = ("activated-lora", "block-diagonal-lora")

# The frameworks that provide these methods.
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


class BlockDiagonalLoRALinear(LoRALinear):
    """LoRA with B (column-parallel layers) or A (row-parallel layers) block-diagonal over `blocks` shards."""

    def __init__(
        self,
        base: nn.Linear,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        blocks: int = 2,
        diagonal: str = "B",
    ):
        super().__init__(base, r, alpha, dropout, use_rslora)
        d_out, d_in = base.weight.shape
        split = d_out if diagonal == "B" else d_in
        if diagonal not in ("A", "B") or r % blocks or split % blocks:
            raise ValueError(f"block-diagonal {diagonal}: {blocks} blocks must divide r = {r} and {split}")
        self.blocks, self.diagonal = blocks, diagonal
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        if diagonal == "A":  # the blocks stacked: (r, d_in / b), block i its rows i·r/b … (i+1)·r/b
            self.A = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(r, d_in // blocks, **factory), a=5**0.5))
        else:  # (d_out, r / b), block i its rows i·d_out/b … (i+1)·d_out/b
            self.B = nn.Parameter(torch.zeros(d_out, r // blocks, **factory))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r × d_in) and B (d_out × r) written out, the block-diagonal one with its zeros."""
        A, B = self.A, self.B
        if self.diagonal == "A":
            A = torch.block_diag(*A.chunk(self.blocks, dim=0))
        else:
            B = torch.block_diag(*B.chunk(self.blocks, dim=0))
        return A, B

    def takes_kernel(self, x: torch.Tensor) -> bool:
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.merged:
            return h
        A, B = self.factors()
        return h + (self.scale * F.linear(F.linear(self.dropout(x).to(A.dtype), A), B)).to(h.dtype)

    def delta_weight(self) -> torch.Tensor:
        A, B = self.factors()
        return self.scale * (B @ A)


@torch.no_grad()
def shard_outputs(layer: BlockDiagonalLoRALinear, x: torch.Tensor) -> list[torch.Tensor]:
    """What each of the layer's `blocks` shards computes from its own slices only: with B block-diagonal
    (column-parallel) its block of the output, concatenated; with A (row-parallel) a partial output,
    summed. No shard reads another's part of A x."""
    b, W, bias = layer.blocks, layer.base.weight, layer.base.bias
    A, B = layer.factors()
    rank = lambda i: slice(i * layer.r // b, (i + 1) * layer.r // b)  # noqa: E731
    outputs = []
    for i in range(b):
        if layer.diagonal == "B":
            rows = slice(i * W.shape[0] // b, (i + 1) * W.shape[0] // b)
            h = F.linear(x, W[rows], None if bias is None else bias[rows])
            outputs.append(h + layer.scale * F.linear(F.linear(x, A[rank(i)]), B[rows, rank(i)]))
        else:
            columns = slice(i * W.shape[1] // b, (i + 1) * W.shape[1] // b)
            x_i = x[..., columns]
            h = F.linear(x_i, W[:, columns], bias if i == 0 and bias is not None else None)
            outputs.append(h + layer.scale * F.linear(F.linear(x_i, A[rank(i), columns]), B[:, rank(i)]))
    return outputs


def inject_block_diagonal_lora(
    model: nn.Module, column_parallel: list[str], row_parallel: list[str], r: int = 8, alpha=16.0, blocks: int = 2
) -> list[str]:
    """Block-diagonal LoRA: B block-diagonal on the column-parallel layers, A on the row-parallel ones."""
    targets = []
    for names, diagonal in ((column_parallel, "B"), (row_parallel, "A")):
        for name in find_targets(model, names) if names else []:
            layer = BlockDiagonalLoRALinear(model.get_submodule(name), r, alpha, blocks=blocks, diagonal=diagonal)
            replace_module(model, name, layer)
            targets.append(name)
    freeze_all_but(model, BlockDiagonalLoRALinear, ("A", "B"))
    return targets


def demo() -> None:
    """Teach a tiny causal LM to answer token 5 everywhere after the invocation [7, 7], while every
    position before it computes exactly what the base model computes; then Block-diagonal LoRA on the
    toy task, and its layers computed shard by shard."""
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

    # Block-diagonal LoRA on the toy MLP, as if served on 4 devices: layer 0 column-parallel, layer 2 row-parallel.
    x, y = toy_task()
    model = toy_model()
    inject_block_diagonal_lora(model, column_parallel=["0"], row_parallel=["2", "4"], r=8, alpha=16, blocks=4)
    before, after = train(model, x, y, lr=1e-2)
    report("block-diagonal lora (4 shards) on 3 layers", model, before, after)
    with torch.no_grad():
        h = model[1](model[0](x))
        split = torch.cat(shard_outputs(model[0], x), dim=-1)  # column-parallel: the shards' blocks side by side
        summed = sum(shard_outputs(model[2], h))  # row-parallel: the shards' partial outputs summed
        errors = ((split - model[0](x)).abs().max().item(), (summed - model[2](h)).abs().max().item())
    print(f"  4 shards, each from its own slices: the layers' outputs to within {max(errors):.1e}")


if __name__ == "__main__":
    demo()
