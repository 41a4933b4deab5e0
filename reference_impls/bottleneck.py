"""Bottleneck adapters: small down-project, nonlinearity, up-project modules added to a frozen network.

Houlsby, Giurgiu, Jastrzebski, Morrone, de Laroussilhe, Gesmundo, Attariyan, Gelly. "Parameter-
Efficient Transfer Learning for NLP." ICML 2019. arXiv:1902.00751. The adapter, for a hidden size d
and a bottleneck size m ≪ d, with its own skip connection:

    A(h) = s · (W_up f(W_down h + b_down) + b_up),     W_down ∈ ℝ^{m×d}, W_up ∈ ℝ^{d×m}

Placements (the module a layer wraps is its "sublayer" F, with input x and output F(x)):

    sequential:   F(x) + A(F(x))    Houlsby: after the attention and the FFN output projections,
                                    before the residual add.
    parallel:     F(x) + A(x)       He, Zhou, Ma, Berg-Kirkpatrick, Neubig, "Towards a Unified View of
                                    Parameter-Efficient Transfer Learning", ICLR 2022, arXiv:2110.04366:
                                    beside the FFN, with s = 1 or s = 4 ("scaled parallel"); their
                                    MAM adapter adds prefix tuning on attention (prefixes.inject_mam).
                                    Chen et al., "AdaptFormer", NeurIPS 2022, arXiv:2205.13535: beside a
                                    ViT's MLP, f = ReLU, s = 0.1.

In a post-norm Transformer (BERT) a sublayer ends in an "Add & Norm" output block, LN(y + r) with
y = dense(h) and r the sublayer's input. Wrapping that block (AddNormAdapter) gives the adapter
both, and one more placement:

    sequential:   LN(y + A(y) + r)                as wrapping the dense layer (Houlsby)
    parallel:     LN(y + A(r) + r)                beside the whole attention or FFN sublayer (He et al.)
    after_block:  LN(y + r) + A(LN(y + r))        Adapter+, as AdapterHub places it (below)
    after_norm:   LN(y + A(LN(y + r)) + r)        Pfeiffer et al. (AdapterFusion, EACL 2021,
                                                  arXiv:2005.00247), after the FFN only: the adapter
                                                  reads the block's normalised output, and the block's
                                                  own LayerNorm runs again after the adapter's residual
                                                  add (as in the authors' AdapterHub)

Bapna & Firat ("Simple, Scalable Adaptation for Neural Machine Translation", EMNLP 2019,
arXiv:1909.08478) normalise the adapter's input: A(h) = W_up ReLU(W_down LN(h)) (+ biases).
Vidoni, Vulić, Glavaš ("Orthogonal Language and Task Adapters in Zero-Shot Cross-Lingual
Transfer", 2020, arXiv:2012.06460) add a penalty that keeps what the adapter adds orthogonal to
what the frozen layer computes: Σ ‖A(h)ᵀ h‖²_F, summed over adapters (`orthogonality_penalty`).

Steitz, Roth. "Adapters Strike Back." CVPR 2024. arXiv:2406.06820 (Adapter+). A study of the
adapter's details for vision Transformers settles on: after the FFN (its output, before the
residual add: `sequential` on a pre-norm block), no LayerNorm in the adapter, GELU, a learned
channel-wise scaling s ∈ ℝ^d instead of a scalar, the Houlsby initialisation (both projections from
a normal of std 10⁻² truncated at ±2·10⁻², biases 0: near, not exactly, the identity) and
stochastic depth on the adapter's branch while training (each sample's branch dropped with
probability p = 0.1, the kept ones scaled by 1/(1 − p)):

    A⁺(h) = s ⊙ (W_up GELU(W_down h + b_down) + b_up) · (ξ / (1 − p)),    ξ ~ Bernoulli(1 − p) per sample

On a post-norm block AdapterHub (`AdapterPlusConfig`) puts it after the block's own Add & Norm, its
output not normalised again (`after_block`: y' = LN(y + r), y' + A⁺(y')); that is what the
reference computes there (tested against it; AdapterHub's stochastic depth needs torchvision, which
does not load against the pinned torch here, so that part is tested from its definition).
Trainable per adapter: 2·d·m + m + 2·d (m = d/96 for ViT-B's d = 768: 8).

AdapterDrop (Rücklé, Geigle, Glockner, Beck, Pfeiffer, Reimers, Gurevych, EMNLP 2021,
arXiv:2010.11918) removes the adapters of the lowest layers, in training and at inference, to save
time at a small cost in accuracy (`drop_adapters`).

W_up (and b_up) start at zero, so every adapter starts as the identity. Trainable parameters per
adapter: 2·d·m + d + m (+ 2·d for the LayerNorm of Bapna & Firat). The nonlinearity keeps adapters
from being folded into the weights: there is no merge.
"""

import torch
from torch import nn

from reference_impls._plumbing import (
    find_targets,
    freeze_all_but,
    output_width,
    replace_module,
    report,
    toy_model,
    toy_task,
    train,
)

FAMILY = "Bottleneck adapters"

# The methods above, and the entries whose contribution uses plain bottleneck adapters (NMT, speech
# and vision-language applications).
IMPLEMENTS = (
    "houlsby-adapter",
    "adapter-plus",
    "unified-view-peft",
    "adaptformer",
    "nmt-adapters",
    "orthoadapters",
    "adapterdrop",
    "monolingual-nmt-adapters",
    "made",
    "nmt-language-domain-adapters",
    "denoising-adapters",
    "speech-translation-adapters",
    "wav2vec2-asr-adapters",
    "vl-adapter",
)

# The frameworks that provide, the surveys that describe and the studies that use these methods.
COVERED_BY = (
    "adapterhub",
    "adapters-library",
    "opendelta",
    "llm-adapters",
    "modular-deep-learning",
    "scaling-down-to-scale-up",
    "peft-ref",
    "peft-survey-han-2024",
    "delta-tuning",
    "adapters-commonsense-knowledge",
    "adapter-tuning-effectiveness",
    "robust-adapter-transfer",
    "intermediate-task-selection",
)

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),  # transformers' "gelu_new"
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


class Adapter(nn.Module):
    """A(h) = s · (W_up f(W_down [LN] h + b_down) + b_up), s a number or ("channel") a trained vector;
    `drop_path` drops the whole output of a sample while training (stochastic depth)."""

    def __init__(
        self,
        d: int,
        m: int,
        activation: str = "relu",
        scale: float | str = 1.0,
        layer_norm: bool = False,
        device=None,
        dtype=None,
        init: str = "zero",
        drop_path: float = 0.0,
    ):
        super().__init__()
        if init not in ("zero", "houlsby") or not 0 <= drop_path < 1:
            raise ValueError(f"init is 'zero' or 'houlsby' and 0 ≤ drop_path < 1, got {init!r}, {drop_path}")
        self.norm = nn.LayerNorm(d, device=device, dtype=dtype) if layer_norm else nn.Identity()
        self.down = nn.Linear(d, m, device=device, dtype=dtype)
        self.f = ACTIVATIONS[activation]()
        self.up = nn.Linear(m, d, device=device, dtype=dtype)
        self.channel_scale = nn.Parameter(torch.ones(d, device=device, dtype=dtype)) if scale == "channel" else None
        self.scale = 1.0 if scale == "channel" else scale
        self.drop_path = drop_path
        if init == "zero":
            nn.init.zeros_(self.up.weight)  # identity at the start
        else:  # Houlsby's: both projections near zero
            for linear in (self.down, self.up):
                nn.init.trunc_normal_(linear.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
                nn.init.zeros_(linear.bias)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.up(self.f(self.down(self.norm(h))))
        if self.training and self.drop_path > 0:  # keep each sample's branch with probability 1 − p
            keep = torch.empty((out.shape[0],) + (1,) * (out.dim() - 1), dtype=out.dtype, device=out.device)
            out = out * keep.bernoulli_(1 - self.drop_path).div_(1 - self.drop_path)
        if self.channel_scale is not None:
            out = out * self.channel_scale
        return self.scale * out


class SequentialAdapter(nn.Module):
    """F(x) + A(F(x)): the adapter reads and corrects the sublayer's output."""

    def __init__(self, sublayer: nn.Module, adapter: nn.Module, track: bool = False):
        super().__init__()
        self.sublayer, self.adapter = sublayer, adapter
        # With track, the last (F(x), A(·)) is kept for orthogonality_penalty. Off by default: a
        # module holding activations cannot be deep-copied and keeps the graph alive.
        self.track, self.last = track, None
        self.dropped = False  # AdapterDrop: when set, the sublayer runs alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.sublayer(x)
        if self.dropped:
            return h
        a = self.adapter(h)
        if self.track:
            self.last = (h, a)
        return h + a


class ParallelAdapter(SequentialAdapter):
    """F(x) + A(x): the adapter runs beside the sublayer on the same input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropped:
            return self.sublayer(x)
        h, a = self.sublayer(x), self.adapter(x)
        if self.track:
            self.last = (h, a)
        return h + a


def is_add_norm_block(module: nn.Module) -> bool:
    """A post-norm output block, LN(dropout(dense(h)) + r): BERT's SelfOutput and Output, RoBERTa's, ..."""
    return (
        isinstance(getattr(module, "dense", None), nn.Linear)
        and isinstance(getattr(module, "LayerNorm", None), nn.LayerNorm)
        and isinstance(getattr(module, "dropout", None), nn.Module)
    )


class AddNormAdapter(SequentialAdapter):
    """An adapter inside an Add & Norm block, which knows y = dropout(dense(h)) and the residual r."""

    def __init__(self, block: nn.Module, adapter: nn.Module, placement: str, track: bool = False):
        super().__init__(block, adapter, track)
        self.placement = placement

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        block = self.sublayer
        y = block.dropout(block.dense(hidden_states))
        if self.dropped:
            return block.LayerNorm(y + residual)
        if self.placement == "sequential":
            read = y
        elif self.placement == "parallel":
            read = residual  # the input of the whole attention or FFN sublayer
        else:  # after_norm, after_block
            read = block.LayerNorm(y + residual)
        a = self.adapter(read)
        if self.track:
            self.last = (read, a)
        if self.placement == "after_block":  # after the block, not normalised again
            return read + a
        return block.LayerNorm(y + a + residual)


def _width(sublayer: nn.Module, placement: str) -> int:
    """d: the sublayer's output width (sequential) or its input width, which must equal its output (parallel)."""
    d_out = output_width(sublayer)
    d_in = next(module for module in sublayer.modules() if isinstance(module, nn.Linear)).in_features
    if placement == "parallel" and d_in != d_out:
        raise ValueError(
            f"a parallel adapter needs a sublayer with equal input and output widths, not {d_in} → {d_out}"
        )
    return d_out


def inject_adapters(
    model: nn.Module,
    target_names: list[str],
    m: int = 64,
    placement: str = "sequential",
    activation: str = "relu",
    scale: float | str = 1.0,
    layer_norm: bool = False,
    track: bool = False,
    init: str = "zero",
    drop_path: float = 0.0,
) -> list[str]:
    """Wrap the named sublayers (any module; an Add & Norm block as AddNormAdapter) with adapters and
    freeze all else; track=True keeps what orthogonality_penalty needs. On a sublayer that is not an
    Add & Norm block, "after_block" is "sequential"."""
    if placement not in ("sequential", "parallel", "after_norm", "after_block"):
        raise ValueError(f"placement is 'sequential', 'parallel', 'after_norm' or 'after_block', not {placement!r}")
    targets = find_targets(model, target_names, kind=nn.Module)
    for name in targets:
        sublayer = model.get_submodule(name)
        weight = next(sublayer.parameters())
        add_norm = is_add_norm_block(sublayer)
        if placement == "after_norm" and not add_norm:
            raise ValueError(
                f"{name}: placement 'after_norm' needs a post-norm output block with dense, dropout and "
                f"LayerNorm (as BERT's SelfOutput and Output), not {type(sublayer).__name__}"
            )
        # In an Add & Norm block the parallel adapter reads the block's residual, whose width is the output's.
        d = output_width(sublayer) if add_norm else _width(sublayer, placement)
        adapter = Adapter(d, m, activation, scale, layer_norm, weight.device, weight.dtype, init, drop_path)
        if add_norm:
            wrapped = AddNormAdapter(sublayer, adapter, placement, track)
        else:
            wrapped = (ParallelAdapter if placement == "parallel" else SequentialAdapter)(sublayer, adapter, track)
        replace_module(model, name, wrapped)
    freeze_all_but(model, Adapter, ("down", "up", "norm", "channel_scale"))
    return targets


# The configurations of the papers, as arguments of inject_adapters (m is chosen per model).
HOULSBY = dict(placement="sequential", activation="swish")  # targets: attention and FFN output projections
PFEIFFER = dict(placement="after_norm", activation="relu")  # target: the FFN's Add & Norm block only
PARALLEL = dict(placement="parallel", activation="relu", scale=1.0)  # target: the whole FFN (or its Add & Norm block)
SCALED_PARALLEL = dict(placement="parallel", activation="relu", scale=4.0)
ADAPTFORMER = dict(placement="parallel", activation="relu", scale=0.1)  # target: the ViT MLP
BAPNA_FIRAT = dict(placement="sequential", activation="relu", layer_norm=True)
# target: the FFN (a pre-norm ViT's MLP; a post-norm block's Add & Norm, after which it goes); m = d / 96
ADAPTER_PLUS = dict(placement="after_block", activation="gelu", scale="channel", init="houlsby", drop_path=0.1)


def drop_adapters(model: nn.Module, lowest: int) -> list[str]:
    """AdapterDrop: switch off the adapters of the `lowest` first adapted places (in module order,
    i.e. the lowest layers); returns their names. drop_adapters(model, 0) switches all back on."""
    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, SequentialAdapter)]
    for index, (_, module) in enumerate(wrapped):
        module.dropped = index < lowest
    return [name for name, _ in wrapped[:lowest]]


def orthogonality_penalty(model: nn.Module) -> torch.Tensor:
    """Σ ‖A(h)ᵀ h‖²_F over the adapters' last forward pass (Vidoni et al.); tokens are rows."""
    terms = []
    for module in model.modules():
        if isinstance(module, SequentialAdapter) and module.last is not None:
            h, a = (tensor.reshape(-1, tensor.shape[-1]) for tensor in module.last)
            terms.append(((a.T @ h.detach()) ** 2).sum())
    if not terms:
        raise ValueError("no tracked adapter has run a forward pass (inject with track=True)")
    return torch.stack(terms).sum()


def demo() -> None:
    """Adapt the frozen MLP: sequential adapters after two layers, a parallel one beside the middle, then Adapter+."""
    x, y = toy_task()
    for name, targets, config in [
        ("Sequential (Houlsby-style) m=8", ["2", "4"], HOULSBY),
        ("Scaled parallel m=8", ["2"], SCALED_PARALLEL),
        ("Adapter+ m=8 (channel scale, stochastic depth 0.1)", ["2", "4"], ADAPTER_PLUS),
    ]:
        model = toy_model()
        inject_adapters(model, targets, m=8, **config)
        before, after = train(model, x, y)
        report(name, model, before, after)


if __name__ == "__main__":
    demo()
