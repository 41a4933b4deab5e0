"""Context-aware prompt tuning (CPT): the prompt is a few labelled examples written out as tokens
(in-context learning), and training refines their embeddings a little, within a bound, and learns
from their labels too.

Blau, Kimhi, Belinkov, et al. "Context-Aware Prompt Tuning: Advancing In-Context Learning with
Adversarial Methods." 2024. arXiv:2410.17222. The context is K demonstrations, each four runs of
tokens: an input template ("Input:"), the input, an output template ("Label:") and the output, with
types 4k−3, 4k−2, 4k−1 and 4k for example k. Their embeddings E₀ (frozen, from the model's
embedding table) get trained offsets Δ; only the first three kinds move (the labels stay as
written), and after every step each row of Δ is projected back into a ball, as an adversarial
attack's perturbation is:

    P = E₀ + Δ,        Δ_i ← Δ_i · ε_i / max(‖Δ_i‖, ε_i),        ε_i = ε · √(d / 2048)   (ε_format for templates)

The query follows the context, X' = [P; X]. The loss is the next-token loss on every label
position, the context's as well as the query's, each example's weighted by γ^j for the j-th label
from the end ("decay"; γ = 1 by default: all alike):

    L = mean over label positions t of  γ^{j(t)} · CE(logits_{t−1}, x_t)

Trained parameters: n · d (Δ), of which the rows of the label tokens stay 0. Equal to PEFT 0.21's
`CPTConfig` (type `cpt`): the same logits, loss (with and without decay) and updated Δ after
training steps on the same batches (tested). PEFT saves the prompt E₀ + Δ, and loads it as E₀ with
Δ = 0; `reference_impls.interop` does the same.
"""

import torch
from torch import nn

from reference_impls._plumbing import freeze_model, report, tiny_causal_lm

FAMILY = "Prompts and prefixes"

IMPLEMENTS = ("cpt",)

# The frameworks that provide these methods.
COVERED_BY = ("hf-peft",)


def example_types(lengths: list[tuple[int, int, int, int]]) -> list[int]:
    """The type of every context token, from each example's (input template, input, output template,
    output) lengths: 4k−3, 4k−2, 4k−1, 4k for example k = 1, 2, …"""
    types = []
    for k, runs in enumerate(lengths, start=1):
        for kind, length in enumerate(runs):
            types += [4 * k - 3 + kind] * length
    return types


class CPTPrompt(nn.Module):
    """P = E₀ + Δ for the context tokens, Δ kept within each token's ε-ball and 0 on label tokens."""

    def __init__(self, embeddings: nn.Embedding, token_ids: list[int], types: list[int], epsilon=0.1,
                 format_epsilon=0.1):  # fmt: skip
        super().__init__()
        if len(token_ids) != len(types):
            raise ValueError(f"CPT needs one type per context token: {len(token_ids)} tokens, {len(types)} types")
        types = torch.tensor(types)
        d = embeddings.weight.shape[1]
        with torch.no_grad():
            self.register_buffer("E0", embeddings(torch.tensor(token_ids)).float())
        self.delta = nn.Parameter(torch.zeros(len(token_ids), d))
        kind = types % 4  # 1, 2, 3: input template, input, output template; 0: output (the label)
        self.register_buffer("movable", (types > 0) & (kind != 0))
        radius = torch.full((len(types),), 1e-10)  # label tokens: a ball of radius ~0
        scale = (d / 2048) ** 0.5
        radius[(types > 0) & ((kind == 1) | (kind == 3))] = format_epsilon * scale
        radius[(types > 0) & (kind == 2)] = epsilon * scale
        self.register_buffer("radius", radius)
        self.register_buffer("types", types)
        self.delta.register_hook(lambda grad: grad * self.movable[:, None])

    @torch.no_grad()
    def project(self) -> None:
        """Each row of Δ back into its ball (what the optimiser's last step moved out of it)."""
        norms = self.delta.norm(dim=1)
        moved = norms > 0
        self.delta[moved] *= (self.radius[moved] / norms[moved].clamp(min=self.radius[moved]))[:, None]

    def forward(self) -> torch.Tensor:
        self.project()
        return self.E0 + self.delta


class CPT(nn.Module):
    """The model with the context prompt before every query and CPT's loss when labels are given."""

    def __init__(self, model: nn.Module, token_ids: list[int], types: list[int], epsilon=0.1, format_epsilon=0.1,
                 decay: float | None = None):  # fmt: skip
        super().__init__()
        self.model = model
        freeze_model(model)
        self.prompt = CPTPrompt(model.get_input_embeddings(), token_ids, types, epsilon, format_epsilon)
        self.register_buffer("token_ids", torch.tensor(token_ids))
        self.decay = decay  # γ: None (or 1) weighs every label alike

    def forward(self, input_ids, attention_mask=None, labels=None, input_type_mask=None, **kwargs):
        batch, length = input_ids.shape
        x = self.model.get_input_embeddings()(input_ids)
        prompt = self.prompt().to(x.dtype).expand(batch, -1, -1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch, len(self.token_ids)), attention_mask], dim=1)
        output = self.model(inputs_embeds=torch.cat([prompt, x], dim=1), attention_mask=attention_mask, **kwargs)
        if labels is not None:
            output.loss = self.loss(output.logits, labels, input_type_mask)
        return output

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, query_types: torch.Tensor | None) -> torch.Tensor:
        """Next-token loss on the label positions of context and query; query tokens are labels
        (type 4) unless `query_types` says otherwise, numbered after the context's examples."""
        batch = labels.shape[0]
        context_types = self.prompt.types.expand(batch, -1)
        if query_types is None:
            query_types = torch.full_like(labels, 4)
        query_types = torch.where(query_types > 0, query_types + context_types.max(), query_types)
        types = torch.cat([context_types, query_types], dim=1)
        targets = torch.cat([self.token_ids.expand(batch, -1), labels], dim=1)
        is_label = (types > 0) & (types % 4 == 0)
        targets = torch.where(is_label, targets, -100)[:, 1:]
        types = types[:, 1:]
        losses = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, reduction="none")
        weights = (targets != -100).float()
        if self.decay is not None:
            for row in range(batch):  # the last example's label weighs 1, the one before γ, …
                groups = types[row][(types[row] > 0) & (types[row] % 4 == 0)].unique()
                for j, group in enumerate(groups.flip(0)):
                    weights[row][types[row] == group] *= self.decay**j
        valid = targets != -100
        return (losses[valid] * weights[valid]).mean()


def demo() -> None:
    """A random two-layer Llama taught a "which token comes next" task in context: three examples
    in the prompt, CPT's bounded refinement of their embeddings, and the loss on held-out queries."""
    model = tiny_causal_lm(vocab=40, width=32, initializer_range=0.3)
    template_in, template_out = [1], [2]  # "Input:", "Label:"
    examples = [(5, 6), (17, 18), (30, 31)]  # input → label: the next token
    token_ids = [t for x, y in examples for t in (*template_in, x, *template_out, y)]
    cpt = CPT(model, token_ids, example_types([(1, 1, 1, 1)] * 3), epsilon=4.0, format_epsilon=4.0)
    queries = torch.tensor([[1, x, 2, x + 1] for x in range(3, 38, 2)])  # template, input, template, label
    query_types = torch.tensor([[1, 2, 3, 4]]).expand(len(queries), -1)
    optimiser = torch.optim.Adam([cpt.prompt.delta], lr=0.1)
    with torch.no_grad():
        before = cpt(queries, labels=queries, input_type_mask=query_types).loss.item()
    for _ in range(60):
        optimiser.zero_grad()
        cpt(queries, labels=queries, input_type_mask=query_types).loss.backward()
        optimiser.step()
    with torch.no_grad():
        after = cpt(queries, labels=queries, input_type_mask=query_types).loss.item()
    report("CPT, 3 examples in context (12 tokens), ε = 4", cpt, before, after)


if __name__ == "__main__":
    demo()
