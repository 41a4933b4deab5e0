"""Prefixes: trainable keys and values in every layer's attention (prefix tuning, P-tuning v2,
cartridges), and adaption prompts with a zero-init gate (LLaMA-Adapter).

Prefix tuning: Li, Liang. "Prefix-Tuning: Optimizing Continuous Prompts for Generation." ACL 2021.
arXiv:2101.00190. Every layer l attends to n extra key and value vectors:

    head(x) = softmax(q [P_K^l; K]ᵀ / √d_h) [P_V^l; V]

The prefixes are trained through a reparameterisation, P = MLP(P'), with a smaller P' ∈ ℝ^{n×d_kv}
(d_kv: one layer's key width) and MLP: d_kv → d_hidden (tanh) → 2·L·d_kv, because optimising P
directly is unstable; after training only P is kept. Trainable parameters:
n·d_kv + (d_kv·d_hidden + d_hidden) + (d_hidden·2·L·d_kv + 2·L·d_kv); kept: n·2·L·d_kv.
P-tuning v2 (Liu, Ji, Fu, Tam, Du, Yang, Tang, ACL 2022, arXiv:2110.07602) is the same deep prompt
trained directly, without the MLP: `PrefixTuning(..., hidden=None)`.

Cartridges: "Cartridges: Lightweight and general-purpose long context representations via
self-study." 2025. arXiv:2506.06266. A long context (a corpus) is replaced by a short trained
key/value cache: P-tuning v2's prefix, n positions of every layer's keys and values, started from
the model's own cache of the corpus's first n tokens (so at the start it is that text, exactly),
its first few positions optionally frozen (the attention sink). The paper trains it by "self-study":
the model, reading the whole corpus, is distilled into the model reading only the cartridge, on
queries about the corpus (`Cartridge.self_study_loss`, not shipped by PEFT):

    L = mean over query tokens t of  KL(p(· | corpus, q_{<t}) ‖ p(· | cartridge, q_{<t}))

The paper's generation of those queries (the model quizzing itself about chunks of the corpus) is
not reproduced: the loss takes them as given. Trainable parameters: (n − frozen) · 2·L·d_kv.

LLaMA-Adapter: Zhang, Han, Zhou, Hu, Yan, Lu, Li, Gao, Qiao. "LLaMA-Adapter: Efficient Fine-tuning
of Language Models with Zero-init Attention." ICLR 2024. arXiv:2303.16199. In the top layers, an
adaption prompt A^l ∈ ℝ^{n×d} is projected by the layer's own key and value projections, and the
queries attend to it with a separate softmax, scaled by a gate g^l that starts at zero, so
training starts from the frozen model exactly:

    attention^l(x) + W_o (g^l · softmax(q (A^l W_k)ᵀ / √d_h) (A^l W_v))       (g per head)

Trainable parameters: L_top · (n·d + heads).

MAM adapter ("mix and match"): He, Zhou, Ma, Berg-Kirkpatrick, Neubig. "Towards a Unified View of
Parameter-Efficient Transfer Learning." ICLR 2022. arXiv:2110.04366. Their best combination:
prefix tuning on attention (n = 30) and a scaled parallel adapter beside every FFN (bottleneck
m = 512, s = 4; see bottleneck.py): FFN(x) + 4 · W_up ReLU(W_down x). Trainable parameters: the
prefix's (above) plus L · (2·d·m + d + m). `inject_mam`.

All wrap a Hugging Face causal language model (any model whose forward takes inputs_embeds,
attention_mask and past_key_values; LLaMA-Adapter needs LLaMA-style attention), or, for
`inject_encoder_prefix`, a BERT-style encoder. A causal LM's prefix takes cache positions, so the
model sees positions n, n+1, ... for the real tokens. Input prompts are in `prompts.py`.
"""

import math

import torch
from torch import nn
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from reference_impls._plumbing import freeze_model, tiny_causal_lm, train_next_tokens, with_prompt_mask
from reference_impls.bottleneck import SCALED_PARALLEL, inject_adapters

FAMILY = "Prompts and prefixes"

IMPLEMENTS = ("prefix-tuning", "p-tuning-v2", "cartridges", "llama-adapter", "unified-view-peft")

# The frameworks that provide, the surveys that describe and the studies that use these methods.
COVERED_BY = (
    "adapters-library",
    "opendelta",
    "hf-peft",
    "llm-adapters",
    "modular-deep-learning",
    "scaling-down-to-scale-up",
    "peft-ref",
    "peft-survey-han-2024",
    "delta-tuning",
)


class Prefixes(nn.Module):
    """P ∈ ℝ^{n × 2·L·d_kv}: every layer's prefix keys and values, trained directly (hidden=None,
    P-tuning v2) or through the reparameterisation P = MLP(P')."""

    def __init__(self, n: int, layers: int, kv_heads: int, head_dim: int, hidden: int | None = 512):
        super().__init__()
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        d_kv = kv_heads * head_dim
        width = 2 * layers * d_kv  # keys and values of every layer
        if hidden is None:  # P-tuning v2: the prefix itself is trained
            self.prefix_input = nn.Parameter(torch.randn(n, width) * 0.02)
            self.mlp = None
        else:  # prefix tuning: P = MLP(P'), then only P is kept (see freeze_prefix)
            self.prefix_input = nn.Parameter(torch.randn(n, d_kv) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(d_kv, hidden), nn.Tanh(), nn.Linear(hidden, width))

    def prefix(self) -> torch.Tensor:
        """P ∈ ℝ^{n × (2·L·d_kv)}: per position, layer 0's key and value, then layer 1's, ..."""
        return self.prefix_input if self.mlp is None else self.mlp(self.prefix_input)

    def keys_and_values(self, dtype) -> torch.Tensor:
        """P as (L·2, heads, n, head_dim): entry 2l is layer l's keys, 2l+1 its values."""
        prefix = self.prefix()
        return prefix.to(dtype).view(len(prefix), 2 * self.layers, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)

    @torch.no_grad()
    def freeze_prefix(self) -> None:
        """After training: compute P once and drop the MLP (the reparameterisation is only for training)."""
        if self.mlp is not None:
            self.prefix_input = nn.Parameter(self.prefix().detach())
            self.mlp = None


class PrefixTuning(Prefixes):
    """Keys and values prepended in every layer of a causal LM, passed to it as its key/value cache."""

    def __init__(self, model: nn.Module, n: int = 20, hidden: int | None = 512):
        config = model.config
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        super().__init__(n, config.num_hidden_layers, kv_heads, head_dim, hidden)
        self.model = model
        freeze_model(model)

    def cache(self, batch: int, dtype) -> DynamicCache:
        kv = self.keys_and_values(dtype).unsqueeze(1).expand(-1, batch, -1, -1, -1)
        cache = DynamicCache()
        for layer in range(self.layers):
            cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
        return cache

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        batch, length = input_ids.shape
        dtype = self.model.get_input_embeddings().weight.dtype
        cache = self.cache(batch, dtype)  # the prefix computed once (through the MLP, if there is one)
        mask = with_prompt_mask(attention_mask, batch, length, cache.get_seq_length(), input_ids.device)
        return self.model(input_ids=input_ids, attention_mask=mask, past_key_values=cache, **kwargs)


class Cartridge(PrefixTuning):
    """A trained key/value cache of n positions, the first `frozen` of them fixed."""

    def __init__(self, model: nn.Module, n: int = 20, frozen: int = 0):
        super().__init__(model, n=n, hidden=None)
        if not 0 <= frozen <= n:
            raise ValueError(f"a cartridge of {n} positions can freeze 0..{n} of them, got {frozen}")
        rows = self.prefix_input.detach()
        self.register_buffer("frozen_rows", rows[:frozen].clone())
        self.prefix_input = nn.Parameter(rows[frozen:].clone())

    def prefix(self) -> torch.Tensor:
        return torch.cat([self.frozen_rows.to(self.prefix_input.dtype), self.prefix_input])

    @torch.no_grad()
    def start_from(self, input_ids: torch.Tensor) -> None:
        """Set the cartridge to the model's own keys and values for the first n tokens of a text (1-D ids)."""
        n = len(self.prefix())
        if len(input_ids) < n:
            raise ValueError(f"a cartridge of {n} positions starts from a text of at least {n} tokens")
        cache = self.model(input_ids=input_ids[None, :n], use_cache=True).past_key_values
        per_layer = [torch.stack([cache.layers[l].keys[0], cache.layers[l].values[0]]) for l in range(self.layers)]
        rows = torch.stack(per_layer).permute(3, 0, 1, 2, 4).reshape(n, -1)  # (n, L·2·heads·head_dim)
        self.frozen_rows.copy_(rows[: len(self.frozen_rows)])
        self.prefix_input.copy_(rows[len(self.frozen_rows) :])

    def self_study_loss(self, corpus_ids: torch.Tensor, query_ids: torch.Tensor) -> torch.Tensor:
        """Context distillation: KL(model(corpus, query) ‖ cartridge(query)) per query token, the
        teacher (the frozen model reading the whole corpus, 1-D ids) without gradients."""
        batch, length = query_ids.shape
        with torch.no_grad():
            teacher = self.model(input_ids=torch.cat([corpus_ids.expand(batch, -1), query_ids], dim=1)).logits
        teacher = teacher[:, -length:].float().log_softmax(-1)
        student = self(query_ids).logits.float().log_softmax(-1)
        return nn.functional.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean()


class PrefixSelfAttention(nn.Module):
    """A BERT-style encoder's self-attention with layer l's prefix keys and values in front:
    softmax(q [P_K; K]ᵀ / √d_h + mask) [P_V; V], the prefix always visible. Positions do not shift
    (unlike a causal LM's cache). Subclasses may rescale the prefix per example (prefix_scale)."""

    def __init__(self, attention: nn.Module, prefixes: Prefixes, layer: int):
        super().__init__()
        if getattr(attention, "position_embedding_type", "absolute") != "absolute":
            raise ValueError("prefix tuning here supports absolute position embeddings only")
        self.attention, self.layer = attention, layer
        self.prefixes = [prefixes]  # a plain list: the prefixes are registered once, on the model

    def prefix_scale(self, hidden_states: torch.Tensor) -> torch.Tensor | float:
        return 1.0

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        attention, (batch, length, _) = self.attention, hidden_states.shape
        heads, head_dim = attention.num_attention_heads, attention.attention_head_size

        def split(t):  # (batch, tokens, heads·d_h) -> (batch, heads, tokens, d_h)
            return t.view(batch, -1, heads, head_dim).transpose(1, 2)

        kv = self.prefixes[0].keys_and_values(hidden_states.dtype)
        scale = self.prefix_scale(hidden_states)
        prefix_k = (kv[2 * self.layer] * scale).expand(batch, -1, -1, -1)
        prefix_v = (kv[2 * self.layer + 1] * scale).expand(batch, -1, -1, -1)
        q = split(attention.query(hidden_states))
        k = torch.cat([prefix_k, split(attention.key(hidden_states))], dim=2)
        v = torch.cat([prefix_v, split(attention.value(hidden_states))], dim=2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        if attention_mask is not None:  # the model's additive (or boolean) mask, over the real tokens
            n = prefix_k.shape[2]
            visible = True if attention_mask.dtype == torch.bool else 0.0
            attention_mask = nn.functional.pad(attention_mask, (n, 0), value=visible)
            scores = scores.masked_fill(~attention_mask, float("-inf")) if visible is True else scores + attention_mask
        probabilities = attention.dropout(torch.softmax(scores, dim=-1))
        return (probabilities @ v).transpose(1, 2).reshape(batch, length, heads * head_dim), None


def inject_encoder_prefix(
    model: nn.Module,
    n: int = 30,
    hidden: int | None = 512,
    attention_type: type = PrefixSelfAttention,
    layers: list[int] | None = None,
) -> Prefixes:
    """Prefix tuning in the self-attention of a BERT-style encoder's layers (`encoder.layer[i].attention.self`;
    all, or those listed in `layers`); the prefixes become `model.prefixes`. Freezes the model; returns them."""
    freeze_model(model)
    config, encoder_layers = model.config, model.encoder.layer
    layers = list(range(len(encoder_layers))) if layers is None else layers
    head_dim = config.hidden_size // config.num_attention_heads
    weight = model.get_input_embeddings().weight
    model.prefixes = Prefixes(n, len(layers), config.num_attention_heads, head_dim, hidden).to(weight.device)
    for position, index in enumerate(layers):  # the prefixes' own layer order: the listed layers, in turn
        layer = encoder_layers[index]
        layer.attention.self = attention_type(layer.attention.self, model.prefixes, position)
    return model.prefixes


class AdaptedAttention(nn.Module):
    """A LLaMA attention layer plus the gated attention to its adaption prompt."""

    def __init__(self, attention: nn.Module, n: int, hidden_size: int, heads: int):
        super().__init__()
        self.attention = attention
        weight = attention.q_proj.weight
        self.prompt = nn.Parameter(torch.randn(n, hidden_size, dtype=weight.dtype) * 0.02)
        self.gate = nn.Parameter(torch.zeros(1, heads, 1, 1, dtype=weight.dtype))  # zero-init: no change at start
        self.heads = heads

    def forward(self, hidden_states, position_embeddings, **kwargs):
        output, weights = self.attention(hidden_states=hidden_states, position_embeddings=position_embeddings, **kwargs)
        attention, (batch, length, _), n = self.attention, hidden_states.shape, self.prompt.shape[0]
        head_dim = attention.head_dim
        q = attention.q_proj(hidden_states).view(batch, length, self.heads, head_dim).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, *position_embeddings)  # the prompt's keys carry no position
        kv_heads = attention.k_proj.out_features // head_dim
        k = attention.k_proj(self.prompt).view(1, n, kv_heads, head_dim).transpose(1, 2)
        v = attention.v_proj(self.prompt).view(1, n, kv_heads, head_dim).transpose(1, 2)
        k = k.repeat_interleave(self.heads // kv_heads, dim=1)  # grouped-query attention shares k, v heads
        v = v.repeat_interleave(self.heads // kv_heads, dim=1)
        scores = torch.softmax((q @ k.transpose(2, 3)) / math.sqrt(head_dim), dim=-1, dtype=torch.float32)
        adapted = ((self.gate * scores.to(q.dtype)) @ v).transpose(1, 2).reshape(batch, length, -1)
        return output + attention.o_proj(adapted), weights


def inject_llama_adapter(model: nn.Module, n: int = 10, top_layers: int = 30) -> nn.Module:
    """Adaption prompts in the top `top_layers` attention layers of a LLaMA-style model; freezes the rest."""
    freeze_model(model)
    layers = model.model.layers
    for layer in layers[max(0, len(layers) - top_layers) :]:
        layer.self_attn = AdaptedAttention(
            layer.self_attn, n, model.config.hidden_size, model.config.num_attention_heads
        )
    return model


def inject_mam(
    model: nn.Module, ffn_names: tuple[str, ...] = ("mlp",), n: int = 30, hidden: int | None = 512, m: int = 512
) -> PrefixTuning:
    """He et al.'s MAM adapter: a scaled parallel adapter beside each FFN named in ffn_names, then
    prefix tuning around the whole model; only the adapters and the prefix are trained."""
    inject_adapters(model, list(ffn_names), m=m, **SCALED_PARALLEL)  # freezes all but the adapters
    adapters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    mam = PrefixTuning(model, n=n, hidden=hidden)  # freezes the model, adapters included
    for parameter in adapters:
        parameter.requires_grad_(True)
    return mam


def demo() -> None:
    """Steer a tiny random LLaMA to answer token 7 after any input, training only the prefixes (or
    LLaMA-Adapter's adaption prompts)."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 32, (64, 8), generator=generator)

    def cartridge(model):
        started = Cartridge(model, n=8, frozen=1)
        started.start_from(torch.randint(0, 32, (8,), generator=generator))
        return started

    targets = torch.full_like(tokens, 7)  # the new task: whatever came before, predict token 7
    for name, make in [
        ("Prefix tuning n=8", lambda: PrefixTuning(tiny_causal_lm(), n=8, hidden=64)),
        ("P-tuning v2 n=8", lambda: PrefixTuning(tiny_causal_lm(), n=8, hidden=None)),
        ("Cartridge n=8 (from a text's cache, 1 position frozen)", lambda: cartridge(tiny_causal_lm())),
        ("LLaMA-Adapter n=8", lambda: inject_llama_adapter(tiny_causal_lm(), n=8, top_layers=2)),
        ("MAM (prefix n=8, parallel adapter m=16)", lambda: inject_mam(tiny_causal_lm(), n=8, hidden=64, m=16)),
    ]:
        train_next_tokens(name, make(), tokens, targets)


if __name__ == "__main__":
    demo()
