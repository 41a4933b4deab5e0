"""Shared plumbing of the reference implementations: finding target modules, swapping them,
freezing the rest, merging them into their base weights, counting parameters, and the toy task
every demo trains on.

Kept out of the method modules so that each of those reads like its paper.
"""

from contextlib import contextmanager

import torch
from torch import nn


def find_targets(model: nn.Module, target_names: list[str], kind: type | tuple[type, ...] = nn.Linear) -> list[str]:
    """Full names of the `kind` submodules whose own name, or full name, is in target_names.

    `["q", "v"]` matches `layers.0.attn.q` and `layers.3.attn.v`; a full name matches only itself.
    """
    wanted = set(target_names)
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, kind) and (name in wanted or name.rsplit(".", 1)[-1] in wanted)
    ]
    if not found:
        kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"no {kinds} module of the model is named any of {sorted(wanted)}")
    return found


def output_width(sublayer: nn.Module) -> int:
    """A sublayer's output width: that of its last nn.Linear (in module order)."""
    linears = [module for module in sublayer.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"cannot tell the width of {type(sublayer).__name__}: it has no nn.Linear")
    return linears[-1].out_features


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def freeze_all_but(
    model: nn.Module, trainable: type | tuple[type, ...], attribute_names: tuple[str, ...] | None = None
) -> None:
    """Freeze every parameter except the named attributes of the method's own modules (with no
    names: all of those modules' own parameters, not those of the base layers they wrap)."""
    freeze_model(model)
    for module in model.modules():
        if isinstance(module, trainable):
            if attribute_names is None:
                parts = list(module.parameters(recurse=False))
            else:  # parameters or whole submodules (a router, an adapter's projections); None: not used here
                parts = [getattr(module, attribute) for attribute in attribute_names]
            for part in parts:
                if part is not None:
                    part.requires_grad_(True)


class ReplacingMerge:
    """Merging for a layer (wrapping `self.base`) whose merged weight is not simply W₀ plus a fixed ΔW:
    a rotation, a projection, a reparameterisation. `merge` writes `merged_weight()` (and
    `merged_bias()`, unless None) into the base layer and keeps the originals W₀ (and b₀), so that
    `unmerge` restores them exactly even where the method's map has no exact inverse."""

    merged: bool = False
    W0: torch.Tensor | None = None  # the original weight, while merged
    b0: torch.Tensor | None = None

    def merged_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def merged_bias(self) -> torch.Tensor | None:
        return None

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight, bias = self.merged_weight(), self.merged_bias()
        self.W0 = self.base.weight.detach().clone()
        self.base.weight.copy_(weight)
        if bias is not None:
            self.b0 = self.base.bias.detach().clone()
            self.base.bias.copy_(bias)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base.weight.copy_(self.W0)
        if self.b0 is not None:
            self.base.bias.copy_(self.b0)
        self.W0, self.b0, self.merged = None, None, False


def set_merged(model: nn.Module, kinds: type | tuple[type, ...], merged: bool) -> None:
    """Merge (merged=True) or unmerge every layer of the given kinds: each knows how, and does
    nothing if it already is in that state."""
    for module in model.modules():
        if isinstance(module, kinds):
            module.merge() if merged else module.unmerge()


@contextmanager
def setting(model: nn.Module, kind: type, attribute: str, value):
    """For the duration of the block, `attribute` of every `kind` module of the model is `value`
    (then None): how a batch tells its layers which task or adapter each row uses."""
    modules = [module for module in model.modules() if isinstance(module, kind)]
    for module in modules:
        setattr(module, attribute, value)
    try:
        yield model
    finally:
        for module in modules:
            setattr(module, attribute, None)


def freeze_model(model: nn.Module) -> None:
    """Every parameter of the model frozen (for methods that add modules beside it, not inside)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def with_prompt_mask(attention_mask, batch: int, length: int, n: int, device) -> torch.Tensor:
    """The attention mask with n always-visible positions in front (a prompt or a prefix)."""
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
    return torch.cat([torch.ones(batch, n, dtype=attention_mask.dtype, device=device), attention_mask], dim=1)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(parameter.numel() for parameter in model.parameters())
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return trainable, total


# ---- the demos' toy task ----------------------------------------------------------------------


def toy_model(width: int = 64, depth: int = 3, seed: int = 0) -> nn.Sequential:
    """A small MLP standing in for a pre-trained network; its Linear layers are named "0", "2", ..."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.GELU()]
    layers.append(nn.Linear(width, width))
    return nn.Sequential(*layers)


def toy_task(width: int = 64, samples: int = 512, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A new task for the frozen model: map x to a fixed random low-rank transform of it."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, width, generator=generator)
    shift = torch.randn(width, 4, generator=generator) @ torch.randn(4, width, generator=generator) / width**0.5
    return x, x @ shift.T + 0.1 * torch.tanh(x)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int = 300,
    lr: float = 1e-2,
    penalty=None,
    optimizer=torch.optim.Adam,
) -> tuple[float, float]:
    """Full-batch training (Adam unless another optimiser class is given) of the trainable parameters,
    minimising the MSE plus `penalty(model)` if given (a method's regulariser); returns the MSE
    before and after."""
    optimizer = optimizer([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss_fn = nn.MSELoss()
    with torch.no_grad():
        before = loss_fn(model(x), y).item()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        if penalty is not None:
            loss = loss + penalty(model)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = loss_fn(model(x), y).item()
    return before, after


def report(name: str, model: nn.Module, before: float, after: float) -> None:
    trainable, total = count_parameters(model)
    print(f"{name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    print(f"loss on the new task: {before:.4g} before, {after:.4g} after training")


def report_merge(model: nn.Module, x: torch.Tensor, merge) -> float:
    """Merge the method into the weights (merge(model)) and print how much the output moved."""
    with torch.no_grad():
        unmerged = model(x)
        merge(model)
        change = (model(x) - unmerged).abs().max().item()
    print(f"  merged into the weights: max output change {change:.2e}")
    return change


# ---- the demos' toy encoder and sequence task (for methods that need attention) -------------------


def tiny_encoder(seed: int = 0):
    """A small random BERT (two layers of width 32) built from a config; nothing is downloaded."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(config).eval()


def toy_sequence_task(samples: int = 256, length: int = 8, seed: int = 1):
    """A new task for the frozen encoder: is token 7 in the sequence? (token ids, labels)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 50, (samples, length), generator=generator)
    labels = torch.randint(0, 2, (samples,), generator=generator)
    positions = torch.randint(0, length, (samples,), generator=generator)
    ids[labels.bool(), positions[labels.bool()]] = 7
    return ids, labels


def train_classifier(
    encoder: nn.Module, ids: torch.Tensor, labels: torch.Tensor, steps: int = 80, lr: float = 1e-2
) -> tuple[float, float, nn.Module]:
    """Train the encoder's trainable parameters and a fresh linear head on the mean token state;
    returns the loss before and after, and the head."""
    head = nn.Linear(encoder.config.hidden_size, 2)
    parameters = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.Adam(parameters, lr=lr)
    loss_of = lambda: nn.functional.cross_entropy(head(encoder(input_ids=ids).last_hidden_state.mean(1)), labels)
    with torch.no_grad():
        before = loss_of().item()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_of()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return before, loss_of().item(), head


# ---- the prompt and prefix demos' tiny language model and task ------------------------------------


def tiny_causal_lm(seed: int = 0, vocab: int = 32, width: int = 48, initializer_range: float = 0.02):
    """A tiny random LLaMA (two layers, the FFN twice as wide) for the demos of methods on language
    models; a larger `initializer_range` gives its frozen head weights that can be sure of a token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         initializer_range=initializer_range)  # fmt: skip
    return LlamaForCausalLM(config)


def train_next_tokens(name: str, model: nn.Module, tokens, targets, steps: int = 60, lr: float = 0.1, **inputs):
    """Adam on the model's trainable parameters so that every position of `tokens` predicts `targets`
    (the logits of added prompt positions dropped); prints the counts and the loss before and after."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        logits = model(input_ids=tokens, **inputs).logits[:, -tokens.shape[1] :]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    trainable, total = count_parameters(model)
    print(f"{name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    print(f"loss on the new task: {losses[0]:.4g} before, {losses[-1]:.4g} after training")
