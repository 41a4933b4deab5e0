"""ShadowPEFT: a small trainable "shadow" network that runs beside a frozen decoder, block by block.
A shadow backbone (the base architecture with one layer, reading the base model's own embeddings)
gives a first shadow state s⁰ for every token; at each decoder block ℓ the gap between the base
hidden state and the shadow state is fed back into the block's input through a rank-r bottleneck,
and the shadow state is moved towards the block's output by a gated update:

    d = h^{ℓ−1} − s^{ℓ−1},        h̃ = h^{ℓ−1} + α · W_up W_down dropout(d),        h^ℓ = Block_ℓ(h̃)
    c = T(h^ℓ),        g = σ(G(h^ℓ)),        s^ℓ = (1 − g) ⊙ s^{ℓ−1} + g ⊙ c

with T and G two-layer GELU MLPs (d → u → d, u = r unless set) and W_up = 0 at the start, so the
model starts as the base model. While training, an auxiliary loss makes the shadow network useful
alone: λ · CE(LM head(s⁰), labels) (the next-token loss on the frozen LM head) is added to the task
loss. The adaptation depends on the input at every layer, so nothing merges into the weights.
Trained parameters: the shadow backbone (without the embeddings it shares), a projection to the base
width if the shadow is narrower, and per block 2·d·r + 2·(2·d·u + u + d).

No paper could be found for it; PEFT 0.21 (`ShadowConfig`, type `shadow`, "mirror" backbones of
decoder-only language models) is the reference: ours gives its logits and losses, in evaluation
and in training with the same seed, and loads its checkpoints (tested).
"""

import copy

import torch
from torch import nn

from reference_impls._plumbing import freeze_model, report, tiny_causal_lm

FAMILY = "Side networks"

IMPLEMENTS = ()

# The frameworks that provide these methods.
COVERED_BY = ("hf-peft",)


class ShadowTrack:
    """The shadow state of the current forward pass, handed from block to block (None: no shadow)."""

    def __init__(self):
        self.state: torch.Tensor | None = None


def update_mlp(d: int, u: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, u), nn.GELU(), nn.Linear(u, d))


class ShadowBlock(nn.Module):
    """A frozen decoder block with the shadow's injection before it and the state update after it."""

    def __init__(self, block: nn.Module, track: ShadowTrack, d: int, r=8, alpha=0.1, dropout=0.2, update_hidden=None):
        super().__init__()
        self.block, self.track, self.alpha = block, track, alpha
        self.down, self.up = nn.Linear(d, r, bias=False), nn.Linear(r, d, bias=False)
        nn.init.zeros_(self.up.weight)  # no injection at the start
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.transform, self.gate = update_mlp(d, update_hidden or r), update_mlp(d, update_hidden or r)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        shadow = self.track.state
        if shadow is None:
            return self.block(hidden_states, *args, **kwargs)
        gap = self.dropout((hidden_states - shadow).to(self.down.weight.dtype))
        injected = hidden_states + (self.alpha * self.up(self.down(gap))).to(hidden_states.dtype)
        out = self.block(injected, *args, **kwargs)
        h = (out if isinstance(out, torch.Tensor) else out[0]).to(self.down.weight.dtype)
        g = torch.sigmoid(self.gate(h))
        self.track.state = ((1 - g) * shadow.to(h.dtype) + g * self.transform(h)).to(shadow.dtype)
        return out


class ShadowPEFT(nn.Module):
    """A Hugging Face decoder-only language model with a shadow network beside its blocks (`blocks`:
    where its nn.ModuleList of decoder blocks is)."""

    def __init__(
        self,
        model: nn.Module,
        r: int = 8,
        alpha: float = 0.1,
        dropout: float = 0.2,
        shadow_layers: int = 1,
        shadow_hidden: int | None = None,
        shadow_intermediate: int | None = None,
        shadow_heads: int | None = None,
        update_hidden: int | None = None,
        auxiliary_weight: float = 0.05,
        share_embeddings: bool = True,
        blocks: str = "model.layers",
    ):
        super().__init__()
        self.model, self.auxiliary_weight = model, auxiliary_weight
        decoder = model.get_submodule(blocks.rsplit(".", 1)[0])
        d = model.config.hidden_size
        config = copy.deepcopy(decoder.config)  # the shadow backbone: the same architecture, smaller
        config.num_hidden_layers = shadow_layers
        for name, value in (
            ("hidden_size", shadow_hidden),
            ("intermediate_size", shadow_intermediate),
            ("num_attention_heads", shadow_heads),
        ):
            if value is not None:
                setattr(config, name, value)
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:shadow_layers]
        self.backbone = type(decoder)(config)
        width = config.hidden_size
        self.share_embeddings = share_embeddings and width == d
        if self.share_embeddings:  # it reads the base model's (frozen) embeddings instead of its own
            del self.backbone.embed_tokens
        self.projection = nn.Linear(width, d, bias=False) if width != d else nn.Identity()
        freeze_model(model)
        self.track = ShadowTrack()
        layers = model.get_submodule(blocks)
        for index, block in enumerate(list(layers)):
            layers[index] = ShadowBlock(block, self.track, d, r, alpha, dropout, update_hidden)
        dtype = next(model.parameters()).dtype
        for module in (self.backbone, self.projection, layers):  # the new parts in the base model's dtype
            module.to(dtype)
        self.initial_state = None

    def shadow_state(self, input_ids=None, attention_mask=None, inputs_embeds=None) -> torch.Tensor:
        """s⁰: the projected last hidden state of the shadow backbone."""
        if self.share_embeddings and inputs_embeds is None:
            inputs_embeds = self.model.get_input_embeddings()(input_ids)
        if inputs_embeds is not None:
            out = self.backbone(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
        else:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return self.projection(out.last_hidden_state)

    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, **kwargs):
        s0 = self.shadow_state(input_ids, attention_mask, inputs_embeds)
        self.track.state, self.initial_state = s0, s0
        try:
            output = self.model(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels, inputs_embeds=inputs_embeds, **kwargs
            )
        finally:
            self.track.state = None
        if labels is not None and self.auxiliary_weight > 0:  # the shadow alone, on the frozen LM head
            logits = self.model.get_output_embeddings()(s0)[..., :-1, :]
            shadow_loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels[..., 1:].reshape(-1), ignore_index=-100
            )
            output.loss = output.loss + self.auxiliary_weight * shadow_loss
            output.shadow_loss = shadow_loss.detach()
        return output


def demo() -> None:
    """A two-layer random Llama made to predict each token's successor in a cyclic vocabulary: the
    frozen model, then ShadowPEFT's shadow trained beside it."""
    model = ShadowPEFT(tiny_causal_lm(width=32, initializer_range=0.3), r=8, dropout=0.0)
    start = torch.randint(0, 32, (64, 1))
    ids = (start + torch.arange(12)) % 32  # every next token is this one + 1
    trained = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(trained, lr=3e-2)
    with torch.no_grad():
        before = model.model(input_ids=ids, labels=ids).loss.item()  # the frozen model (no shadow)
    for _ in range(100):
        optimiser.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimiser.step()
    with torch.no_grad():
        output = model(input_ids=ids, labels=ids)
        after = (output.loss - model.auxiliary_weight * output.shadow_loss).item()
    report("shadow (r = 8, a one-layer shadow backbone)", model, before, after)


if __name__ == "__main__":
    demo()
