"""Adapters whose weights a shared hypernetwork generates from task and layer embeddings (HyperFormer++).

Karimi Mahabadi, Ruder, Dehghani, Henderson. "Parameter-efficient Multi-task Fine-tuning for
Transformers via Shared Hypernetworks." ACL 2021. arXiv:2106.04489. One frozen model learns many
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
"""

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from reference_impls._plumbing import find_targets, replace_module, setting, toy_model, toy_task

IMPLEMENTS = ("hyperformer",)


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

    def __init__(self, d: int, m: int, tasks: int, layers: int, places: int, t: int = 64, hidden: int = 128,
                 t_projected: int = 64):
        super().__init__()
        self.d, self.m = d, m
        self.tasks, self.layers, self.places = nn.Embedding(tasks, t), nn.Embedding(layers, t), nn.Embedding(places, t)
        self.project = nn.Sequential(_generator(3 * t, hidden), nn.ReLU(), _generator(hidden, t_projected),
                                     nn.LayerNorm(t_projected))
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
        return AdapterWeights(self.down(I).view(self.m, self.d), self.down_bias(I), self.up(I).view(self.d, self.m),
                              self.up_bias(I), self.norm_weight(I), self.norm_bias(I))


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


def inject_hyperformer(model: nn.Module, target_names: list[str], tasks: int, m: int, t: int = 64,
                       hidden: int = 128, t_projected: int = 64) -> HyperNetwork:
    """Put a generated adapter after each module named in target_names (the name's position in the
    list is its place, its n-th occurrence its layer), all made by one hypernetwork; freeze all but
    it, and return it."""
    targets = find_targets(model, target_names, kind=nn.Module)
    place_of = {name: next(j for j, wanted in enumerate(target_names) if name == wanted or name.endswith("." + wanted))
                for name in targets}
    layer_of = {name: sum(place_of[other] == place_of[name] for other in targets[:i]) for i, name in enumerate(targets)}
    d = [module for module in model.get_submodule(targets[0]).modules() if isinstance(module, nn.Linear)][-1].out_features
    hypernetwork = HyperNetwork(d, m, tasks, max(layer_of.values()) + 1, len(target_names), t, hidden, t_projected)
    weight = next(model.parameters())
    hypernetwork.to(device=weight.device, dtype=weight.dtype)
    for name in targets:
        replace_module(model, name, HyperAdapter(model.get_submodule(name), hypernetwork, layer_of[name], place_of[name]))
    model.requires_grad_(False)
    hypernetwork.requires_grad_(True)
    return hypernetwork


def use_task(model: nn.Module, task: int):
    """`with use_task(model, task):` the model's generated adapters are those of `task`."""
    return setting(model, HyperNetwork, "task", task)


def use_task_and_run(model: nn.Module, task: int, x: torch.Tensor) -> torch.Tensor:
    with use_task(model, task):
        return model(x)


def demo() -> None:
    """Two tasks on one frozen MLP, learnt together through one hypernetwork (a batch of one task per step)."""
    x, y1 = toy_task(seed=1)
    _, y2 = toy_task(seed=2)
    model = toy_model()
    inject_hyperformer(model, ["2", "4"], tasks=2, m=8, t=16, hidden=32, t_projected=16)
    loss_fn = nn.MSELoss()

    def losses() -> list[float]:
        with torch.no_grad():
            return [loss_fn(use_task_and_run(model, task, x), y).item() for task, y in enumerate((y1, y2))]

    before = losses()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(400):
        task, y = step % 2, (y1, y2)[step % 2]
        optimizer.zero_grad()
        loss_fn(use_task_and_run(model, task, x), y).backward()
        optimizer.step()
    after = losses()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"HyperFormer++ (2 tasks, 2 places, m=8): {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / total:.2f}%)")
    for task in range(2):
        print(f"loss on the new task: {before[task]:.4g} before, {after[task]:.4g} after training (task {task})")


if __name__ == "__main__":
    demo()
