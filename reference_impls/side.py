"""Networks beside a frozen backbone: ladder side-tuning and K-Adapter's knowledge adapters. Both
read the backbone's hidden states, and no gradient ever flows through the backbone.

Sung, Cho, Bansal. "LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer Learning."
NeurIPS 2022. arXiv:2206.06522. Adapters and LoRA sit inside the backbone, so training them still
back-propagates through every backbone layer and keeps its activations. LST moves all trainable
weights into a separate side network of width d/r (r the reduction factor) that reads the
backbone's hidden states h_i through "ladder" down-projections, mixed in by learned gates:

    s_0 = D_0 x                                              (x: the backbone's input, e.g. embeddings)
    μ_i = σ(α_i / T),   s_i = f_i( μ_i s_{i−1} + (1 − μ_i) D_i h_i )      for each backbone block i
    y   = head( U · LN(s_L) )                                 (U: d/r → d, the backbone's own head)

with T = 0.1 and α_i = 0 at the start (μ_i = ½), f_i a side block (the backbone's block type at
width d/r in the paper). The backbone runs once, without autograd, so its activations are not kept:
memory for training falls with the side network's size. Trainable: d·d_s (D_0) + L·d·d_s (D_i)
+ L (α) + the side blocks + 2·d_s (LN) + d_s·d + d (U), with d_s = d/r (+ d_s per D with biases).
The paper initialises each side block from its backbone block by structural pruning (keeping the
dimensions Fisher information ranks highest); here side blocks start at random. The authors' code
also offers gating after the side block and a final gate with the backbone's output; neither is here.

K-Adapter: Wang, Tang, Duan, Wei, Huang, Ji, Cao, Jiang, Zhou. "K-Adapter: Infusing Knowledge into
Pre-Trained Models with Adapters." Findings of ACL 2021 (2021.findings-acl.121). Each kind of knowledge
(factual: relations between entities; linguistic: dependency parses) gets its own adapter outside
the frozen model, trained alone on its own task. An adapter is a chain of adapter layers; layer j
reads the backbone's hidden state at a chosen depth l_j (RoBERTa-large in the authors' code: the
outputs of its embeddings, layer 11 and layer 22) plus what the previous adapter layer made:

    a_0 = 0,    a_j = K_j(h_{l_j} + a_{j−1}),    K(z) = z + U · T_N(D z)        (D: d → d_a, U: d_a → d)

with T_N a stack of N transformer layers of width d_a (N = 2, d_a = 768 in the paper), so that each
adapter layer is itself a small transformer with a skip connection. As in the authors' code, every
`skip` adapter layers (3 there) the chain adds a skip from an earlier adapter layer's output:
a_j ← a_j + a_{j/skip}. The adapters' outputs meet the backbone's last hidden state h_L in the task
model, by concatenation (the authors' "concat" fusion):

    f_k = F_k [h_L; a^k],      t = F [f_1; …; f_K],      y = head(t)            (F_k, F: 2d → d or K·d → d)

Trainable parameters per adapter layer: d·d_a + d_a (D) + N·(4·d_a² + 4·d_a + 2·d_a·d_f + d_f + d_a + 4·d_a)
(transformer layers of feed-forward width d_f) + d_a·d + d (U); the fusion adds K·(2d·d + d) + (K·d·d + d).
Summaries of the paper give the read layers as 0, 11 and 23; the authors' code reads hidden states 0, 11
and 22 (of RoBERTa-large's 25), as the defaults here do.
"""

from collections.abc import Callable, Sequence

import torch
from torch import nn

from reference_impls._plumbing import count_parameters, report, tiny_encoder, toy_model, toy_task, train

FAMILY = "Side networks"

IMPLEMENTS = ("ladder-side-tuning", "k-adapter")

# The frameworks that provide, the surveys that describe and the studies that use these methods.
COVERED_BY = (
    "scaling-down-to-scale-up",
    "peft-survey-han-2024",
)


class LadderSideNetwork(nn.Module):
    """Frozen backbone blocks (and head), and a trainable side network reading them through gated ladders."""

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        side_blocks: Sequence[nn.Module],
        d: int,
        d_side: int,
        head: nn.Module | None = None,
        temperature: float = 0.1,
    ):
        super().__init__()
        if len(blocks) != len(side_blocks):
            raise ValueError(f"one side block per backbone block: {len(side_blocks)} for {len(blocks)}")
        self.blocks, self.head = nn.ModuleList(blocks), head if head is not None else nn.Identity()
        self.blocks.requires_grad_(False)
        self.head.requires_grad_(False)
        weight = next(self.blocks.parameters())
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.first_down = nn.Linear(d, d_side, **factory)
        self.downs = nn.ModuleList(nn.Linear(d, d_side, **factory) for _ in blocks)
        self.side_blocks = nn.ModuleList(side_blocks)
        self.gates = nn.Parameter(torch.zeros(len(blocks), **factory))  # α_i = 0: μ_i = ½
        self.norm = nn.LayerNorm(d_side, **factory)
        self.up = nn.Linear(d_side, d, **factory)
        self.temperature = temperature

    def backbone_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """h_1 … h_L, computed without autograd: nothing of the backbone is kept for the backward pass."""
        states = []
        with torch.no_grad():
            h = x
            for block in self.blocks:
                h = block(h)
                h = h[0] if isinstance(h, tuple) else h  # transformers' layers return tuples
                states.append(h)
        return states

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = self.first_down(x)
        for h, down, block, alpha in zip(self.backbone_states(x), self.downs, self.side_blocks, self.gates):
            mu = torch.sigmoid(alpha / self.temperature)
            side = block(mu * side + (1 - mu) * down(h))
        return self.head(self.up(self.norm(side)))


def ladder_side_tuning(
    blocks: Sequence[nn.Module],
    d: int,
    reduction: int = 8,
    make_side_block: Callable[[int], nn.Module] | None = None,
    head: nn.Module | None = None,
) -> LadderSideNetwork:
    """An LST model around a backbone given as its blocks (and head). make_side_block(d_side) builds
    one side block; by default a small MLP (Linear, GELU) of width d/reduction."""
    d_side = max(1, d // reduction)
    make = make_side_block or (lambda width: nn.Sequential(nn.Linear(width, width), nn.GELU()))
    weight = next(iter(blocks[0].parameters()))
    side_blocks = [make(d_side).to(device=weight.device, dtype=weight.dtype) for _ in blocks]
    return LadderSideNetwork(blocks, side_blocks, d, d_side, head)


# ---- K-Adapter ------------------------------------------------------------------------------------


class KnowledgeAdapterLayer(nn.Module):
    """K(z) = z + U · T_N(D z): down to width d_a, N transformer layers, back up, plus the skip."""

    def __init__(
        self,
        d: int,
        d_adapter: int,
        transformer_layers: int = 2,
        heads: int = 12,
        d_feedforward=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.down, self.up = nn.Linear(d, d_adapter, **factory), nn.Linear(d_adapter, d, **factory)
        layer = lambda: nn.TransformerEncoderLayer(
            d_adapter,
            heads,
            d_feedforward or 4 * d_adapter,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            **factory,
        )  # post-norm, as BERT's
        self.transformer = nn.ModuleList(layer() for _ in range(transformer_layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        a = self.down(z)
        for layer in self.transformer:
            a = layer(a)
        return z + self.up(a)


class KnowledgeAdapter(nn.Module):
    """A chain of adapter layers, layer j reading the backbone's hidden state number read_layers[j]."""

    def __init__(
        self,
        d: int,
        read_layers: Sequence[int] = (0, 11, 22),
        d_adapter: int = 768,
        transformer_layers: int = 2,
        heads: int = 12,
        skip: int = 3,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.read_layers, self.skip = tuple(read_layers), skip
        self.layers = nn.ModuleList(
            KnowledgeAdapterLayer(d, d_adapter, transformer_layers, heads, device=device, dtype=dtype)
            for _ in read_layers
        )

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """hidden_states: the backbone's (embeddings, layer 1, …, layer L), as transformers returns them."""
        a, outputs = torch.zeros_like(hidden_states[-1]), []
        for j, (layer, read) in enumerate(zip(self.layers, self.read_layers), start=1):
            a = layer(hidden_states[read] + a)
            outputs.append(a)
            if self.skip and j % self.skip == 0:
                a = a + outputs[j // self.skip]  # the authors' skip: an earlier adapter layer's output
        return a


class KAdapterModel(nn.Module):
    """A frozen encoder, knowledge adapters beside it, their outputs fused with its last hidden state."""

    def __init__(self, backbone: nn.Module, adapters: dict[str, KnowledgeAdapter]):
        super().__init__()
        self.backbone, self.adapters = backbone, nn.ModuleDict(adapters)
        self.backbone.requires_grad_(False)
        d = backbone.config.hidden_size
        weight = next(backbone.parameters())
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.fuse_each = nn.ModuleDict({name: nn.Linear(2 * d, d, **factory) for name in adapters})  # F_k
        self.fuse_all = nn.Linear(len(adapters) * d, d, **factory)  # F

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """t: the task features per token (batch, tokens, d); a task head reads them."""
        with torch.no_grad():  # the backbone runs without autograd: nothing of it is kept for backward
            states = self.backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        last = states.hidden_states[-1]
        fused = [
            self.fuse_each[name](torch.cat([last, adapter(states.hidden_states)], dim=-1))
            for name, adapter in self.adapters.items()
        ]
        return self.fuse_all(torch.cat(fused, dim=-1))


def inject_k_adapter(
    backbone: nn.Module,
    names: Sequence[str] = ("factual", "linguistic"),
    read_layers: Sequence[int] | None = None,
    d_adapter: int | None = None,
    transformer_layers: int = 2,
    heads: int | None = None,
    skip: int = 3,
) -> KAdapterModel:
    """K-Adapter around a Hugging Face encoder: one knowledge adapter per name (train each on its own
    task, then freeze or keep training it), fused for a downstream task. By default an adapter reads
    hidden states 0, 11 and 22 (the authors' choice for RoBERTa-large) and has the backbone's width
    and head count."""
    config = backbone.config
    read_layers = tuple(read_layers) if read_layers is not None else (0, 11, 22)
    if max(read_layers) > config.num_hidden_layers:
        raise ValueError(f"read_layers {read_layers}: the backbone has hidden states 0 to {config.num_hidden_layers}")
    weight = next(backbone.parameters())
    adapters = {
        name: KnowledgeAdapter(
            config.hidden_size,
            read_layers,
            d_adapter or config.hidden_size,
            transformer_layers,
            heads or config.num_attention_heads,
            skip,
            device=weight.device,
            dtype=weight.dtype,
        )
        for name in names
    }
    return KAdapterModel(backbone, adapters)


def k_adapter_layer_parameters(d: int, d_adapter: int, transformer_layers: int = 2, d_feedforward=None) -> int:
    """The trainable-parameter formula of one adapter layer (module docstring)."""
    f = d_feedforward or 4 * d_adapter
    transformer = 4 * d_adapter**2 + 4 * d_adapter + 2 * d_adapter * f + f + d_adapter + 4 * d_adapter
    return (d * d_adapter + d_adapter) + transformer_layers * transformer + (d_adapter * d + d)


def demo() -> None:
    """The toy MLP's first two layers as the frozen backbone, its last as the frozen head."""
    x, y = toy_task()
    backbone = toy_model()
    blocks = [nn.Sequential(backbone[0], backbone[1]), nn.Sequential(backbone[2], backbone[3])]
    model = ladder_side_tuning(blocks, d=64, reduction=4, head=backbone[4])
    before, after = train(model, x, y)
    report("Ladder side-tuning, side width 16", model, before, after)
    mu = torch.sigmoid(model.gates / model.temperature)
    print(
        f"  gates μ after training (1: the side network's own state, 0: the backbone's): "
        f"{', '.join(f'{value:.2f}' for value in mu.tolist())}"
    )
    k_adapter_demo()


def k_adapter_demo() -> None:
    """Two knowledge adapters beside a frozen tiny BERT, each trained on its own toy "knowledge" task
    (is token 7 in the sequence; is token 9), then frozen and fused for a task that needs both (both)."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 50, (128, 8), generator=generator)
    for token in (7, 9):  # each appears in about half of the sequences, at a random place
        rows = torch.rand(128, generator=generator) < 0.5
        ids[rows, torch.randint(0, 8, (int(rows.sum()),), generator=generator)] = token
    has = {token: (ids == token).any(1).long() for token in (7, 9)}
    both = has[7] & has[9]
    model = inject_k_adapter(tiny_encoder(), read_layers=(0, 1, 2), d_adapter=16, heads=4)

    def fit(parameters, labels, features, steps=50):
        head = nn.Linear(32, 2)
        optimizer = torch.optim.Adam(list(parameters) + list(head.parameters()), lr=1e-2)
        loss_of = lambda: nn.functional.cross_entropy(head(features().mean(1)), labels)
        with torch.no_grad():
            before = loss_of().item()
        for _ in range(steps):
            optimizer.zero_grad()
            loss_of().backward()
            optimizer.step()
        with torch.no_grad():
            return before, loss_of().item()

    for (name, adapter), token in zip(model.adapters.items(), (7, 9)):

        def features(adapter=adapter):
            with torch.no_grad():
                states = model.backbone(input_ids=ids, output_hidden_states=True).hidden_states
            return adapter(states)

        before, after = fit(adapter.parameters(), has[token], features)
        print(f"K-Adapter, {name} adapter alone on its knowledge task (token {token}): loss {before:.4g} → {after:.4g}")
    model.adapters.requires_grad_(False)  # the knowledge stays as learned; only the fusion learns the task
    before, after = fit(
        list(model.fuse_each.parameters()) + list(model.fuse_all.parameters()), both, lambda: model(ids)
    )
    trainable = sum(p.numel() for p in list(model.fuse_each.parameters()) + list(model.fuse_all.parameters()))
    adapters = sum(p.numel() for p in model.adapters.parameters())
    _, total = count_parameters(model)
    print(
        f"K-Adapter: 2 knowledge adapters ({adapters:,} parameters, frozen) fused by {trainable:,} trainable "
        f"parameters, of {total:,} in all, plus the head"
    )
    print(f"loss on the new task: {before:.4g} before, {after:.4g} after training")


if __name__ == "__main__":
    demo()
