"""Selective fine-tuning: train a chosen part of the existing model (LayerNorms, value biases, a sparse
mask of a weight, some embedding rows), everything else frozen. BitFit's relatives (see `sparse`).

**LN tuning.** Zhao, Tu, Wei, et al. "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal
LLM Finetuning." ICLR 2024. arXiv:2312.11420. Only the normalisation layers are trained: for a
LayerNorm (or RMSNorm) LN(x) = γ ⊙ (x − μ)/σ + β, the scale γ and shift β. Parameters: d (RMSNorm)
or 2d (LayerNorm) per norm. The trained copy replaces the frozen norm; nothing is left to merge.

**BEFT.** Huang, Balashankar, Aminifar. "BEFT: Bias-Efficient Fine-Tuning of Language Models in
Low-Data Regimes." ACL 2026. arXiv:2509.15974. Which biases to tune: the paper finds those of the value projections
the most effective, so a bias βᵥ ∈ ℝ^{d_out} is trained on every value projection, added where the
model has one and created (from 0) where it has none:

    h = W_v x + b_v + βᵥ

Parameters: d_out per value projection. It merges into b_v (a layer without a bias gets one).

**SHiRA.** Bhardwaj, Pandey, Priyadarshi, et al. "Sparse High Rank Adapters." NeurIPS 2024.
arXiv:2406.13175. A fixed sparse mask of the weight — r (d_in + d_out) entries, LoRA's
parameter count for rank r, at random positions — is trained directly:

    W = W₀ + S,        S = 0 outside the mask

S is sparse but of high rank, and switching adapters only rewrites the masked entries. Parameters:
r (d_in + d_out). The positions are saved with the adapter (PEFT draws them with `random_seed`).

**Trainable tokens** (PEFT's `trainable_tokens`; no paper): only the embedding rows of chosen token
ids are trained, e.g. for new special tokens: E′[t] = Eₜ′ for t in the chosen ids (starting as the
old rows), E′[t] = E[t] otherwise. Parameters: d per chosen token.

All four equal PEFT 0.21 (`ln_tuning`, `beft`, `shira`, `trainable_tokens`);
`reference_impls.interop` loads their checkpoints.
"""

import copy

import torch
from torch import nn
from torch.nn import functional as F

from reference_impls._plumbing import (
    count_parameters,
    find_targets,
    freeze_all_but,
    replace_module,
    report,
    report_merge,
    set_merged,
    toy_model,
    toy_task,
    train,
)
from reference_impls.lora import LoRALinear

FAMILY = "Sparse fine-tuning"

IMPLEMENTS = ("ln-tuning", "beft", "shira")

# The frameworks that provide these methods.
COVERED_BY = ("hf-peft",)


# ---- LN tuning --------------------------------------------------------------------------------


class TunedNorm(nn.Module):
    """A trained copy of a normalisation layer in place of the frozen one (kept as `base`)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base, self.tuned = base, copy.deepcopy(base)

    def forward(self, *args, **kwargs):
        return self.tuned(*args, **kwargs)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, or a model's own RMSNorm/LayerNorm class (LlamaRMSNorm, T5LayerNorm, …)."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def inject_ln_tuning(model: nn.Module, target_names: list[str]) -> list[str]:
    """Replace the named norms by trained copies and freeze everything else."""
    targets = [name for name in find_targets(model, target_names, kind=nn.Module) if is_norm(model.get_submodule(name))]
    if not targets:
        raise ValueError(f"no normalisation layer of the model is named any of {sorted(target_names)}")
    for name in targets:
        replace_module(model, name, TunedNorm(model.get_submodule(name)))
    freeze_all_but(model, TunedNorm, ("tuned",))
    return targets


# ---- BEFT -------------------------------------------------------------------------------------


class BiasTunedLinear(nn.Module):
    """h = W x + b + β: a trained bias β (from 0) on a frozen nn.Linear, with or without its own bias."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.beta = nn.Parameter(torch.zeros(base.out_features, device=base.weight.device, dtype=base.weight.dtype))
        self.merged, self.created_bias = False, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        return h if self.merged else h + self.beta.to(h.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            if self.base.bias is None:  # the bias BEFT tunes did not exist: create it, remove it at unmerge
                self.base.bias = nn.Parameter(torch.zeros_like(self.beta), requires_grad=False)
                self.created_bias = True
            self.base.bias += self.beta.to(self.base.bias.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            if self.created_bias:
                self.base.bias, self.created_bias = None, False
            else:
                self.base.bias -= self.beta.to(self.base.bias.dtype)
            self.merged = False


def inject_beft(model: nn.Module, target_names: list[str] = ("v_proj", "value")) -> list[str]:
    """Train a bias on the named projections (by default the value projections: the paper's choice)."""
    targets = find_targets(model, list(target_names))
    for name in targets:
        replace_module(model, name, BiasTunedLinear(model.get_submodule(name)))
    freeze_all_but(model, BiasTunedLinear, ("beta",))
    return targets


# ---- SHiRA ------------------------------------------------------------------------------------


def random_mask_positions(d_out: int, d_in: int, r: int, seed: int | None = None) -> torch.Tensor:
    """(2 × r(d_in + d_out)) rows and columns of a random mask, sorted row by row."""
    count = r * (d_in + d_out)
    if count > d_out * d_in:
        raise ValueError(f"SHiRA rank {r} asks for {count} entries of a {d_out} × {d_in} weight")
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    flat = torch.randperm(d_out * d_in, generator=generator)[:count].sort().values
    return torch.stack([flat // d_in, flat % d_in])


class SHiRALinear(nn.Module):
    """h = (W₀ + S) x + b, S trained at fixed sparse positions (r(d_in + d_out) of them)."""

    def __init__(self, base: nn.Linear, r: int = 8, seed: int | None = None, positions: torch.Tensor | None = None):
        super().__init__()
        self.base = base
        if positions is None and base.weight.is_meta:  # counting parameters only: no need to draw the mask
            positions = torch.empty(2, r * (base.in_features + base.out_features), dtype=torch.long, device="meta")
        elif positions is None:
            positions = random_mask_positions(base.out_features, base.in_features, r, seed)
        self.register_buffer("positions", positions.long().to(base.weight.device))
        self.s = nn.Parameter(torch.zeros(positions.shape[1], device=base.weight.device, dtype=base.weight.dtype))
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        return self.s.new_zeros(self.base.weight.shape).index_put(tuple(self.positions), self.s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return F.linear(x, self.base.weight + self.delta_weight(), self.base.bias)

    merge, unmerge = LoRALinear.merge, LoRALinear.unmerge


def inject_shira(model: nn.Module, target_names: list[str], r: int = 8, seed: int | None = None) -> list[str]:
    targets = find_targets(model, target_names)
    for name in targets:
        replace_module(model, name, SHiRALinear(model.get_submodule(name), r, seed))
    freeze_all_but(model, SHiRALinear, ("s",))
    return targets


# ---- Trainable tokens -------------------------------------------------------------------------


class TrainableTokens(nn.Module):
    """An nn.Embedding whose rows for `token_ids` are trained (starting as the frozen rows)."""

    def __init__(self, base: nn.Embedding, token_ids: list[int]):
        super().__init__()
        if len(set(token_ids)) != len(token_ids) or not all(0 <= t < base.num_embeddings for t in token_ids):
            raise ValueError(f"token ids must be distinct and below {base.num_embeddings}, got {token_ids}")
        self.base = base
        self.register_buffer("token_ids", torch.tensor(token_ids, device=base.weight.device))
        self.rows = nn.Parameter(base.weight.detach()[self.token_ids].clone())

    def weight(self) -> torch.Tensor:
        return self.base.weight.index_copy(0, self.token_ids, self.rows.to(self.base.weight.dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        base = self.base
        return F.embedding(ids, self.weight(), base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq)


def tied_to(model: nn.Module, embedding_name: str) -> list[str]:
    """The other names under which the model holds the embedding's weight (a tied output head)."""
    weight = model.get_submodule(embedding_name).weight
    everywhere = model.named_parameters(remove_duplicate=False)  # a tied weight appears under both names
    return [name for name, p in everywhere if p is weight and not name.startswith(embedding_name + ".")]


def inject_trainable_tokens(model: nn.Module, embedding_name: str, token_ids: list[int]) -> TrainableTokens:
    """Train only the rows of `token_ids` of the named embedding. A model whose output head shares
    the embedding's weight (tied) is refused: the head would keep the old rows."""
    embedding = model.get_submodule(embedding_name)
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"{embedding_name!r} is a {type(embedding).__name__}, not an nn.Embedding")
    tied = tied_to(model, embedding_name)
    if tied:
        raise ValueError(f"the embedding's weight is tied to {tied[0]!r}: trainable tokens here handle untied models")
    layer = TrainableTokens(embedding, token_ids)
    replace_module(model, embedding_name, layer)
    freeze_all_but(model, TrainableTokens, ("rows",))
    return layer


SELECTIVE_LAYERS = (BiasTunedLinear, SHiRALinear)


def merge_selective(model: nn.Module) -> None:
    set_merged(model, SELECTIVE_LAYERS, True)


def unmerge_selective(model: nn.Module) -> None:
    set_merged(model, SELECTIVE_LAYERS, False)


def demo() -> None:
    """SHiRA and BEFT on the toy task; LN tuning on a toy model with LayerNorms; new token rows."""
    x, y = toy_task()
    model = toy_model()
    inject_shira(model, ["0", "2", "4"], r=4, seed=0)
    before, after = train(model, x, y, lr=1e-2)
    report("shira (r = 4) on 3 layers", model, before, after)
    with torch.no_grad():
        rank = torch.linalg.matrix_rank(model[0].delta_weight()).item()
    print(f"  rank of the first layer's sparse update: {rank} of 64")
    report_merge(model, x, merge_selective)

    model = toy_model()
    with torch.no_grad():  # a task that moves the outputs by a constant: what a bias can learn
        y_shifted = model(x) + torch.randn(64, generator=torch.Generator().manual_seed(2))
    inject_beft(model, ["4"])  # the toy model has no value projection: its output layer's bias
    before, after = train(model, x, y_shifted, lr=1e-2)
    report("beft on the output layer (a shifted task)", model, before, after)

    torch.manual_seed(0)
    normed = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64), nn.LayerNorm(64))
    with torch.no_grad():
        y_scaled = normed(x) * torch.linspace(0.5, 1.5, 64) + 0.1
    inject_ln_tuning(normed, ["1", "4"])
    before, after = train(normed, x, y_scaled, lr=1e-2)
    report("ln tuning on 2 LayerNorms", normed, before, after)

    embedding = nn.Embedding(100, 16)
    lm = nn.Sequential(embedding, nn.Linear(16, 100))
    inject_trainable_tokens(lm, "0", [97, 98, 99])
    ids = torch.tensor([[97, 98, 99, 5]])
    target = torch.tensor([[5, 6, 7, 8]])
    loss = lambda: F.cross_entropy(lm(ids).flatten(0, 1), target.flatten())  # noqa: E731
    optimizer = torch.optim.Adam([p for p in lm.parameters() if p.requires_grad], lr=0.1)
    start = loss().item()
    for _ in range(100):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    trainable, total = count_parameters(lm)
    print(f"trainable tokens: {trainable} of {total:,} parameters; three new tokens learn where to point")
    print(f"loss on the new task: {start:.4g} before, {loss().item():.4g} after training")


if __name__ == "__main__":
    demo()
