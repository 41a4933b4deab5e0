"""Prompts: trainable vectors put before the input embeddings, which the frozen model reads as tokens.

Prompt tuning: Lester, Al-Rfou, Constant. "The Power of Scale for Parameter-Efficient Prompt
Tuning." EMNLP 2021. arXiv:2104.08691. n soft tokens P ∈ ℝ^{n×d} are prepended to the input
embeddings: X' = [P; X]. Trainable parameters: n·d.

P-tuning: Liu, Zheng, Du, et al. "GPT Understands, Too." AI Open 2023. arXiv:2103.10385. The
prompt is not trained directly but produced by a small encoder from trained inputs E ∈ ℝ^{n×d},
which couples the prompt tokens and eases optimisation (the paper places them among the input
tokens by a template; PEFT, and this reference, put them first):

    P = MLP(E)        or        P = MLP(BiLSTM(E)),        X' = [P; X]

(PEFT's MLP: d → h → h → d with ReLUs; its LSTM variant: a bidirectional LSTM of width h, then
2h → 2h → d.) After training only P is kept, so serving is prompt tuning's. Trainable parameters:
n·d plus the encoder's.

Multitask prompt tuning: Wang, Panda, Karlinsky, Feris, Sun, Kim. "Multitask Prompt Tuning Enables
Parameter-Efficient Transfer Learning." ICLR 2023. arXiv:2303.02861. One prompt P* is shared by T
tasks; task k's prompt is P* scaled entry by entry by a low-rank matrix of its own,

    P_k = P* ⊙ (U_k V_k),        U_k ∈ ℝ^{n×r},  V_k ∈ ℝ^{r×d}        (r = 1 in the paper)

each input row carrying its task id. Trainable parameters: n·d + T·r·(n + d).

All three wrap a Hugging Face causal language model (any model whose forward takes
inputs_embeds and attention_mask). The prompt takes positions, so the model sees positions
n, n+1, ... for the real tokens. Prefixes, in every layer's attention, are in `prefixes.py`.
"""

import torch
from torch import nn

from reference_impls._plumbing import freeze_model, tiny_causal_lm, train_next_tokens, with_prompt_mask

FAMILY = "Prompts and prefixes"

IMPLEMENTS = ("prompt-tuning", "p-tuning", "multitask-prompt-tuning")

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


class PromptTuning(nn.Module):
    """X' = [P; X] at the input; the logits include the n prompt positions first."""

    def __init__(self, model: nn.Module, n: int = 20):
        super().__init__()
        self.model = model
        freeze_model(model)
        embeddings = model.get_input_embeddings().weight
        self.prompt = nn.Parameter(torch.randn(n, embeddings.shape[1], dtype=embeddings.dtype) * embeddings.std())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        x = self.model.get_input_embeddings()(input_ids)
        batch, length = input_ids.shape
        prompt = self.prompt.to(x.dtype)  # once: for P-tuning it is the encoder's output
        mask = with_prompt_mask(attention_mask, batch, length, len(prompt), x.device)
        prompt = prompt.expand(batch, -1, -1)
        return self.model(inputs_embeds=torch.cat([prompt, x], dim=1), attention_mask=mask, **kwargs)


class PTuning(PromptTuning):
    """Prompt tuning whose prompt is an encoder's output, P = MLP(E) or MLP(BiLSTM(E))."""

    def __init__(
        self, model: nn.Module, n: int = 20, hidden: int | None = None, encoder: str = "MLP", lstm_layers: int = 2
    ):
        nn.Module.__init__(self)  # not PromptTuning's: here the prompt is computed, not stored
        self.model = model
        freeze_model(model)
        d = model.get_input_embeddings().weight.shape[1]
        h = hidden or d
        self.prompt_input = nn.Parameter(torch.randn(n, d))  # E, as nn.Embedding starts: N(0, 1)
        if encoder == "MLP":
            self.lstm = None
            self.mlp = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))
        elif encoder == "LSTM":
            self.lstm = nn.LSTM(d, h, num_layers=lstm_layers, bidirectional=True, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            raise ValueError(f"P-tuning's encoder is 'MLP' or 'LSTM', got {encoder!r}")

    @property
    def prompt(self) -> torch.Tensor:
        x = self.prompt_input
        if self.lstm is not None:
            x = self.lstm(x[None])[0][0]  # one sequence of n tokens, read both ways
        return self.mlp(x)

    def freeze_prompt(self) -> PromptTuning:
        """Prompt tuning with P as it is now: what serving needs (and what PEFT saves)."""
        served = PromptTuning(self.model, n=len(self.prompt_input))
        with torch.no_grad():
            served.prompt.copy_(self.prompt)
        return served


class MultitaskPromptTuning(nn.Module):
    """X' = [P* ⊙ (U_k V_k); X] for each row's task k: one shared prompt, a low-rank scaling per task."""

    def __init__(self, model: nn.Module, n: int = 20, tasks: int = 1, r: int = 1):
        super().__init__()
        self.model = model
        freeze_model(model)
        embeddings = model.get_input_embeddings().weight
        d = embeddings.shape[1]
        self.prompt = nn.Parameter(torch.randn(n, d, dtype=embeddings.dtype) * embeddings.std())  # P*
        self.U = nn.Parameter(torch.randn(tasks, n, r) * 0.02)
        self.V = nn.Parameter(torch.randn(tasks, r, d) * 0.02)

    def prompts(self, task_ids: torch.Tensor) -> torch.Tensor:
        """(batch, n, d): every row's task prompt P* ⊙ (U_k V_k)."""
        return self.prompt * (self.U[task_ids] @ self.V[task_ids])

    def forward(self, input_ids: torch.Tensor, task_ids: torch.Tensor, attention_mask=None, **kwargs):
        x = self.model.get_input_embeddings()(input_ids)
        batch, length = input_ids.shape
        mask = with_prompt_mask(attention_mask, batch, length, len(self.prompt), x.device)
        prompts = self.prompts(task_ids).to(x.dtype)
        return self.model(inputs_embeds=torch.cat([prompts, x], dim=1), attention_mask=mask, **kwargs)


def demo() -> None:
    """Steer a tiny random LLaMA to answer token 7 after any input, training only the prompt; then two
    tasks at once with one shared prompt."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 32, (64, 8), generator=generator)

    targets = torch.full_like(tokens, 7)  # the new task: whatever came before, predict token 7
    for name, make in [
        ("Prompt tuning n=8", lambda: PromptTuning(tiny_causal_lm(), n=8)),
        ("P-tuning n=8 (MLP encoder)", lambda: PTuning(tiny_causal_lm(), n=8, hidden=32)),
    ]:
        train_next_tokens(name, make(), tokens, targets)
    # Two tasks sharing one prompt: the first half of the rows must answer 7, the second half 3.
    task_ids = torch.arange(64) // 32
    two_tasks = torch.where(task_ids[:, None] == 0, 7, 3).expand_as(tokens)
    model = MultitaskPromptTuning(tiny_causal_lm(), n=8, tasks=2, r=1)
    train_next_tokens("Multitask prompt tuning n=8, 2 tasks", model, tokens, two_tasks, task_ids=task_ids)


if __name__ == "__main__":
    demo()
