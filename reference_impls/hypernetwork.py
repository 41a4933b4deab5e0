"""Adapters whose weights are generated: from task and layer embeddings (HyperFormer++), or from a
language's typological features (UDapter).

Karimi Mahabadi, Ruder, Dehghani, Henderson. "Parameter-efficient Multi-task Fine-tuning for
Transformers via Shared Hypernetworks." ACL 2021 (2021.acl-long.47). One frozen model learns many
tasks at once. Instead of one adapter per task and place, a single hypernetwork makes every adapter's
weights from three learned embeddings (width t): the task's z_τ, the layer's l_i and the place's
p_j (after attention or after the FFN), joined and projected by a small MLP:

    I = LN( W₂ ReLU(W₁ [z_τ; l_i; p_j] + b₁) + b₂ )                      (width t')
    D = reshape(W_D I + c_D) ∈ ℝ^{m×d},  U = reshape(W_U I + c_U) ∈ ℝ^{d×m}  (and biases b_D, b_U likewise)
    γ = W_γ I + c_γ,  β = W_β I + c_β                                     (a task-conditioned LayerNorm)

    A(h) = h + LN_{γ,β}( U f(D h + b_D) + b_U ),       f = GELU,   placed after each sublayer output h

The trainable parameters do not grow with the number of layers or places, only by t per task:
T·t + (L + P)·t + (3t·k + k) + (k·t' + t') + 2t' + 2·(t'·d·m + d·m) + (t'·m + m) + (t'·d + d) + 2·(t'·d + d),
with k the MLP's hidden width. As in the authors' code, generators start at N(0, 0.01²) with zero bias,
so adapters start close to, not exactly at, the identity.

Üstün, Bisazza, Bouma, van Noord. "UDapter: Language Adaptation for Truly Universal Dependency
Parsing." EMNLP 2020 (ACL Anthology 2020.emnlp-main.180). One multilingual model with "contextual
parameter generation": each adapter's weights are a linear function of a language embedding e
(width k), itself computed from the language's typological feature vector v (lang2vec: syntax,
phonology, phoneme inventory), so that a language never seen in training gets adapters from its
features alone:

    e = W₂ ReLU(W₁ v + b₁) + b₂,     D = Σ_j e_j 𝐃_j,  b_D = Σ_j e_j 𝐛_j,  U = Σ_j e_j 𝐔_j,  b_U = Σ_j e_j 𝐜_j
    A(h) = h + U GELU(D h + b_D) + b_U              (after the attention and FFN output projections)

with one set of tensors 𝐃 ∈ ℝ^{k×m×d}, 𝐔 ∈ ℝ^{k×d×m} (and biases) per place: k·(2·d·m + d + m) per
place plus the embedding MLP. As in the authors' code, 𝐃 and 𝐔 start at N(0, 0.0002²), biases at 0.
(The authors can also append a one-hot language id to v, dropped at random while training; not here.)

Ansell, Ponti, Pfeiffer, Ruder, Glavaš, Vulić, Korhonen. "MAD-G: Multilingual Adapter Generation for
Efficient Cross-Lingual Transfer." Findings of EMNLP 2021 (2021.findings-emnlp.410). Contextual
parameter generation for MAD-X's language adapters (composition.py), with ONE generator for all
layers: a language's typological vector t (URIEL / lang2vec features) becomes a language embedding,
joined with a learned embedding of the layer, and a linear map turns the pair into all the weights
of that layer's adapter:

    λ = V t,      θ_i = W [λ; ι_i] + c  →  (D, b_D, U, b_U),      A_i(u) = U ReLU(D u + b_D) + b_U

with the adapter in MAD-X's (Pfeiffer's) place, reading the FFN's Add & Norm output u = LN(y + r), or
after any sublayer. Trained on many languages at once, it gives an unseen language an adapter from
its features alone. Trainable: F·d_λ (V) + L·d_ι (layer embeddings) + (d_λ + d_ι + 1)·(2·d·m + d + m)
(W and c), independent of the number of languages. W starts at N(0, 0.01²) and c at 0, so adapters
start close to zero. We could not check here whether the paper joins λ and ι by concatenation (as
here) or adds them, nor its initialisation.
"""

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from reference_impls._plumbing import (
    count_parameters,
    find_targets,
    output_width,
    replace_module,
    report,
    setting,
    toy_model,
    toy_task,
)

FAMILY = "Hypernetworks"

IMPLEMENTS = ("hyperformer", "udapter", "mad-g")

# The frameworks that provide, the surveys that describe and the studies that use these methods.
COVERED_BY = ("modular-deep-learning",)


class AdapterWeights(NamedTuple):
    down: torch.Tensor  # (m, d)
    down_bias: torch.Tensor  # (m,)
    up: torch.Tensor  # (d, m)
    up_bias: torch.Tensor  # (d,)
    norm_weight: torch.Tensor  # (d,)
    norm_bias: torch.Tensor  # (d,)


def _generator(width_in: int, width_out: int) -> nn.Linear:
    linear = nn.Linear(width_in, width_out)
    nn.init.normal_(linear.weight, std=1e-2)
    nn.init.zeros_(linear.bias)
    return linear


class HyperNetwork(nn.Module):
    """Task, layer and place embeddings → the weights of one adapter."""

    def __init__(
        self,
        d: int,
        m: int,
        tasks: int,
        layers: int,
        places: int,
        t: int = 64,
        hidden: int = 128,
        t_projected: int = 64,
    ):
        super().__init__()
        self.d, self.m = d, m
        self.tasks, self.layers, self.places = nn.Embedding(tasks, t), nn.Embedding(layers, t), nn.Embedding(places, t)
        self.project = nn.Sequential(
            _generator(3 * t, hidden), nn.ReLU(), _generator(hidden, t_projected), nn.LayerNorm(t_projected)
        )
        self.down, self.down_bias = _generator(t_projected, m * d), _generator(t_projected, m)
        self.up, self.up_bias = _generator(t_projected, d * m), _generator(t_projected, d)
        self.norm_weight, self.norm_bias = _generator(t_projected, d), _generator(t_projected, d)
        self.task: int | None = None  # set by use_task() for a batch

    def embedding(self, task: int, layer: int, place: int) -> torch.Tensor:
        """I: the projected joint embedding of one adapter."""
        index = torch.tensor(0, device=self.tasks.weight.device)
        joined = torch.cat([self.tasks(index + task), self.layers(index + layer), self.places(index + place)])
        return self.project(joined)

    def forward(self, layer: int, place: int) -> AdapterWeights:
        if self.task is None:
            raise ValueError("which task is this batch? Call the model inside `with use_task(model, task):`")
        I = self.embedding(self.task, layer, place)
        return AdapterWeights(
            self.down(I).view(self.m, self.d),
            self.down_bias(I),
            self.up(I).view(self.d, self.m),
            self.up_bias(I),
            self.norm_weight(I),
            self.norm_bias(I),
        )


class HyperAdapter(nn.Module):
    """A sublayer F, then h + LN_{γ,β}(U f(D h + b_D) + b_U) with weights made for this task and place."""

    def __init__(self, sublayer: nn.Module, hypernetwork: HyperNetwork, layer: int, place: int):
        super().__init__()
        self.sublayer, self.layer, self.place = sublayer, layer, place
        self.hypernetwork = hypernetwork  # the same module in every adapter: its parameters count once

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        h = self.sublayer(*inputs)
        w = self.hypernetwork(self.layer, self.place)
        a = F.linear(F.gelu(F.linear(h, w.down, w.down_bias)), w.up, w.up_bias)
        return h + F.layer_norm(a, (h.shape[-1],), w.norm_weight, w.norm_bias)


def inject_hyperformer(
    model: nn.Module, target_names: list[str], tasks: int, m: int, t: int = 64, hidden: int = 128, t_projected: int = 64
) -> HyperNetwork:
    """Put a generated adapter after each module named in target_names (the name's position in the
    list is its place, its n-th occurrence its layer), all made by one hypernetwork; freeze all but
    it, and return it."""
    targets = find_targets(model, target_names, kind=nn.Module)
    place_of = {
        name: next(j for j, wanted in enumerate(target_names) if name == wanted or name.endswith("." + wanted))
        for name in targets
    }
    layer_of = {name: sum(place_of[other] == place_of[name] for other in targets[:i]) for i, name in enumerate(targets)}
    d = output_width(model.get_submodule(targets[0]))
    hypernetwork = HyperNetwork(d, m, tasks, max(layer_of.values()) + 1, len(target_names), t, hidden, t_projected)
    weight = next(model.parameters())
    hypernetwork.to(device=weight.device, dtype=weight.dtype)
    for name in targets:
        replace_module(
            model, name, HyperAdapter(model.get_submodule(name), hypernetwork, layer_of[name], place_of[name])
        )
    model.requires_grad_(False)
    hypernetwork.requires_grad_(True)
    return hypernetwork


def use_task(model: nn.Module, task: int):
    """`with use_task(model, task):` the model's generated adapters are those of `task`."""
    return setting(model, HyperNetwork, "task", task)


# ---- UDapter: adapters generated from language features ------------------------------------------


class LanguageEmbedding(nn.Module):
    """e = W₂ ReLU(W₁ v + b₁) + b₂ for the language of the batch, v its row of the feature table."""

    def __init__(self, features: torch.Tensor, k: int = 32, hidden: int = 64):
        super().__init__()
        self.register_buffer("features", features)  # (languages, F): fixed, not trained
        self.project = nn.Sequential(nn.Linear(features.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, k))
        self.language: int | None = None  # set by use_language() for a batch

    def forward(self) -> torch.Tensor:
        if self.language is None:
            raise ValueError("which language is this batch? Call the model inside `with use_language(model, index):`")
        return self.project(self.features[self.language])


class GeneratedAdapter(nn.Module):
    """A sublayer F, then h + U GELU(D h + b_D) + b_U with D, U, b_D, b_U linear in the language embedding."""

    def __init__(self, sublayer: nn.Module, language: LanguageEmbedding, d: int, m: int, k: int):
        super().__init__()
        weight = next(sublayer.parameters())
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.sublayer, self.language = sublayer, language  # the embedding is shared by every place
        self.down = nn.Parameter(torch.empty(k, m, d, **factory).normal_(0, 2e-4))
        self.down_bias = nn.Parameter(torch.zeros(k, m, **factory))
        self.up = nn.Parameter(torch.empty(k, d, m, **factory).normal_(0, 2e-4))
        self.up_bias = nn.Parameter(torch.zeros(k, d, **factory))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        h = self.sublayer(*inputs)
        e = self.language()
        down = torch.einsum("k,kmd->md", e, self.down)
        up = torch.einsum("k,kdm->dm", e, self.up)
        return h + F.linear(F.gelu(F.linear(h, down, e @ self.down_bias)), up, e @ self.up_bias)


def inject_udapter(
    model: nn.Module, target_names: list[str], features: torch.Tensor, m: int = 64, k: int = 32, hidden: int = 64
) -> LanguageEmbedding:
    """Generated adapters after the named sublayers, for languages described by the rows of `features`;
    everything else frozen. Returns the language embedding (shared by all places)."""
    targets = find_targets(model, target_names, kind=nn.Module)
    weight = next(model.parameters())
    language = LanguageEmbedding(features, k, hidden).to(device=weight.device, dtype=weight.dtype)  # buffer too
    for name in targets:
        sublayer = model.get_submodule(name)
        replace_module(model, name, GeneratedAdapter(sublayer, language, output_width(sublayer), m, k))
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, GeneratedAdapter):
            for parameter in module.parameters(recurse=False):  # its generator tensors, not the sublayer
                parameter.requires_grad_(True)
    language.requires_grad_(True)
    return language


# ---- MAD-G: one generator of language adapters for all layers ---------------------------------------


class LanguageAdapterGenerator(nn.Module):
    """(typological vector t, layer i) → θ_i = W [V t; ι_i] + c, the weights of layer i's adapter."""

    def __init__(self, features: torch.Tensor, layers: int, d: int, m: int, d_language: int = 32, d_layer: int = 8):
        super().__init__()
        self.d, self.m = d, m
        self.register_buffer("features", features)  # (languages, F): fixed, not trained
        self.language_projection = nn.Linear(features.shape[1], d_language, bias=False)  # V
        self.layer_embeddings = nn.Embedding(layers, d_layer)  # ι
        self.generate = _generator(d_language + d_layer, 2 * d * m + d + m)  # W, c
        self.language: int | None = None  # set by use_language() for a batch

    def forward(self, layer: int) -> AdapterWeights:
        if self.language is None:
            raise ValueError("which language is this batch? Call the model inside `with use_language(model, index):`")
        z = torch.cat([self.language_projection(self.features[self.language]), self.layer_embeddings.weight[layer]])
        theta = self.generate(z)
        d, m = self.d, self.m
        down, down_bias, up, up_bias = theta.split([m * d, m, d * m, d])
        ones, zeros = torch.ones(d, device=theta.device, dtype=theta.dtype), torch.zeros_like(theta[:d])
        return AdapterWeights(down.view(m, d), down_bias, up.view(d, m), up_bias, ones, zeros)


class GeneratedLanguageAdapter(nn.Module):
    """A_i(u) = U ReLU(D u + b_D) + b_U with layer i's weights from the shared generator (no residual:
    bottleneck.py's wrappers add it, and place it)."""

    def __init__(self, generator: LanguageAdapterGenerator, layer: int):
        super().__init__()
        self.generator, self.layer = [generator], layer  # a plain list: not registered here, but ...
        if layer == 0:
            self.shared_generator = generator  # ... once, by the first layer's adapter (state_dict, .to())

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        w = self.generator[0](self.layer)
        return F.linear(
            F.relu(F.linear(u, w.down.to(u.dtype), w.down_bias.to(u.dtype))), w.up.to(u.dtype), w.up_bias.to(u.dtype)
        )


def inject_mad_g(
    model: nn.Module,
    target_names: list[str],
    features: torch.Tensor,
    m: int = 48,
    d_language: int = 32,
    d_layer: int = 8,
) -> LanguageAdapterGenerator:
    """MAD-G's generated language adapters at the named places, the n-th match being layer n: in
    MAD-X's place for post-norm Add & Norm blocks (BERT's `encoder.layer.{i}.output`), else after the sublayer; one
    generator for all of them (registered in the first). Everything else is frozen. Returns it."""
    from reference_impls.bottleneck import AddNormAdapter, SequentialAdapter, is_add_norm_block

    targets = find_targets(model, target_names, kind=nn.Module)
    weight = next(model.parameters())
    d = output_width(model.get_submodule(targets[0]))
    generator = LanguageAdapterGenerator(features, len(targets), d, m, d_language, d_layer)
    generator.to(device=weight.device, dtype=weight.dtype)
    for layer, name in enumerate(targets):
        sublayer, adapter = model.get_submodule(name), GeneratedLanguageAdapter(generator, layer)
        wrapped = (
            AddNormAdapter(sublayer, adapter, "after_norm")
            if is_add_norm_block(sublayer)
            else SequentialAdapter(sublayer, adapter)
        )
        replace_module(model, name, wrapped)
    model.requires_grad_(False)
    generator.requires_grad_(True)
    return generator


def mad_g_parameters(features: int, layers: int, d: int, m: int, d_language: int = 32, d_layer: int = 8) -> int:
    """The trainable-parameter formula of the module docstring."""
    return features * d_language + layers * d_layer + (d_language + d_layer + 1) * (2 * d * m + d + m)


def use_language(model: nn.Module, language: int):
    """`with use_language(model, index):` the adapters (UDapter's or MAD-G's) are generated for that
    row of the feature table."""
    return setting(model, (LanguageEmbedding, LanguageAdapterGenerator), "language", language)


def use_task_and_run(model: nn.Module, task: int, x: torch.Tensor) -> torch.Tensor:
    with use_task(model, task):
        return model(x)


def demo() -> None:
    """HyperFormer++: two tasks on one frozen MLP through one hypernetwork (one task per step).
    UDapter and MAD-G: three training languages described by two features; a fourth, unseen, by its
    features only."""
    x, y1 = toy_task(seed=1)
    _, y2 = toy_task(seed=2)
    loss_fn = nn.MSELoss()
    model = toy_model()
    inject_hyperformer(model, ["2", "4"], tasks=2, m=8, t=16, hidden=32, t_projected=16)
    with torch.no_grad():
        before = [loss_fn(use_task_and_run(model, task, x), y).item() for task, y in enumerate((y1, y2))]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(400):
        optimizer.zero_grad()
        loss_fn(use_task_and_run(model, step % 2, x), (y1, y2)[step % 2]).backward()
        optimizer.step()
    with torch.no_grad():
        after = [loss_fn(use_task_and_run(model, task, x), y).item() for task, y in enumerate((y1, y2))]
    trainable, total = count_parameters(model)
    print(
        f"HyperFormer++ (2 tasks, 2 places, m=8): {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%)"
    )
    for task in range(2):
        print(f"loss on the new task: {before[task]:.4g} before, {after[task]:.4g} after training (task {task})")

    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.5]])  # the last language is unseen
    targets = [f[0] * y1 + f[1] * y2 for f in features]

    def train_three_languages_report_the_fourth(name: str, model: nn.Module) -> None:
        def unseen_loss() -> float:
            with torch.no_grad(), use_language(model, 3):
                return loss_fn(model(x), targets[3]).item()

        before = unseen_loss()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(600):
            language = step % 3
            optimizer.zero_grad()
            with use_language(model, language):
                loss_fn(model(x), targets[language]).backward()
            optimizer.step()
        report(f"{name}, on a 4th language never trained on", model, before, unseen_loss())

    model = toy_model()
    inject_udapter(model, ["2", "4"], features, m=8, k=8, hidden=16)
    train_three_languages_report_the_fourth("UDapter (3 training languages, 2 places, m=8, k=8)", model)
    model = toy_model()
    inject_mad_g(model, ["2", "4"], features, m=8, d_language=8, d_layer=4)
    train_three_languages_report_the_fourth("MAD-G (one generator for 2 layers, m=8)", model)


if __name__ == "__main__":
    demo()
