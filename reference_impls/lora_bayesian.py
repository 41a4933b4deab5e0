"""MonteCLoRA: LoRA whose A is, while training, a Monte Carlo average over a mixture of Gaussian
perturbations, with a Wishart hyperprior on their covariance and a Dirichlet one on the mixture's
weights, so that the low-rank update is estimated with less variance and depends less on the
learning rate and batch size.

Seth, Pathak, Sengupta, Verma, Raman, Gopalakrishnan, Chatterjee, Chakraborty. "Robust and Efficient
Fine-tuning of LLMs with Bayesian Reparameterization of Low-Rank Adaptation." TMLR 2025.
arXiv:2411.04358. For each LoRA layer, N samples per step (reparameterised: the standard draws z
come from a fixed buffer refilled now and then, the learned quantities enter by transformation):

    Σ = diag(max(diag(S W S), 10⁻³)),        S = diag(exp(σ)),   W ~ Wishart(r, I)          (r × r)
    ε_n = c · z_n Σ^½,        z_n ~ N(0, I) ∈ ℝ^{d_in×r}                                       (n = 1 … N)
    π = softmax(μ + L ζ),        μ = log a − mean(log a),   a = exp(κ),   ζ ~ N(0, I)
    A' = A + Σ_n π_n ε_nᵀ,        h = W₀ x + s · B A' x

(π: the Dirichlet(a) mixture weights in their logistic-normal, Laplace approximation, L the Cholesky
factor of its diagonal covariance 1/aᵢ (1 − 2/N) + Σⱼ 1/aⱼ / N².) At evaluation A' = A: the model is
LoRA, and merges as LoRA. The regulariser added to the task loss is the mean over layers of

    λ · (KL(Dir(a) ‖ Dir(β)) + KL(Wishart(r, S²) ‖ Wishart(r, I)) + N · KL(N(0, Σ) ‖ N(0, I)))

plus Σ_n π_n² with `entropy`.

Trained parameters: LoRA's r (d_in + d_out) plus r + N per layer (σ and κ).

Equal to PEFT 0.21's `MontecloraConfig` (a LoRA option): the same outputs in evaluation and, on the
same standard draws, in training (tested, its buffer of draws copied), and its checkpoints load.
PEFT's Dirichlet term is not the KL divergence: it adds Σ log Γ(aᵢ) − Σ log Γ(β) where the KL
subtracts them (for a = (0.5, 2, 1.3), β = 0.3 it gives −4.66, the KL 0.99); the reference computes
the KL (tested against torch.distributions), and its other two terms equal PEFT's.
"""

import torch
from torch import nn
from torch.distributions import Chi2

from reference_impls._plumbing import (
    find_targets,
    freeze_all_but,
    replace_module,
    report,
    report_merge,
    toy_model,
    toy_task,
    train,
)
from reference_impls.lora import LoRALinear, merge_lora

FAMILY = "Low-rank updates"

IMPLEMENTS = ("monteclora",)

# The frameworks that provide these methods.
COVERED_BY = ("hf-peft",)


def wishart_sample(p: int) -> torch.Tensor:
    """W ~ Wishart(p, I), by Bartlett's decomposition: W = L Lᵀ, Lᵢᵢ² ~ χ²(p − i), Lᵢⱼ ~ N(0, 1) below."""
    L = torch.diag(Chi2(torch.arange(p, 0, -1, dtype=torch.float32)).sample().sqrt())
    rows, cols = torch.tril_indices(p, p, -1)
    L[rows, cols] = torch.randn(len(rows))
    return L @ L.T


class MonteCLoRALinear(LoRALinear):
    """LoRA whose A is perturbed by a Monte Carlo mixture of Gaussians while training."""

    def __init__(
        self, base: nn.Linear, r=8, alpha=16.0, dropout=0.0, use_rslora=False, samples=8, dirichlet_prior=0.1,
        sample_scale=1e-4, kl_weight=1e-5, entropy=False, buffer_size=150,
    ):  # fmt: skip
        super().__init__(base, r, alpha, dropout, use_rslora)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.log_std = nn.Parameter(torch.rand(r, **factory))  # σ: S = diag(exp σ)
        self.log_concentration = nn.Parameter(torch.rand(samples, **factory))  # κ: a = exp κ
        self.register_buffer("variance", torch.eye(r, **factory))  # Σ of the last training step
        self.register_buffer("mixture", torch.full((samples,), 1 / samples, **factory))  # π of the last step
        self.samples, self.dirichlet_prior, self.sample_scale = samples, dirichlet_prior, sample_scale
        self.kl_weight, self.entropy, self.buffer_size = kl_weight, entropy, buffer_size
        self.draws: list[dict[str, torch.Tensor]] = []  # the standard draws z, W, ζ, used one per step

    def takes_kernel(self, x: torch.Tensor) -> bool:
        return False if self.training else super().takes_kernel(x)

    @torch.no_grad()
    def next_draws(self) -> dict[str, torch.Tensor]:
        if not self.draws:  # a buffer's worth at a time, as PEFT: z, ζ in bulk, then one W per entry
            z = torch.randn(self.buffer_size, self.samples, self.A.shape[1], self.r)
            zeta = torch.randn(self.buffer_size, self.samples)
            self.draws = [{"z": z[i], "W": wishart_sample(self.r), "zeta": zeta[i]} for i in range(self.buffer_size)]
        return self.draws.pop(0)

    def perturbation(self) -> torch.Tensor:
        """Σ_n π_n ε_nᵀ (r × d_in), and Σ, π kept for the regulariser."""
        draws = {k: v.to(self.log_std) for k, v in self.next_draws().items()}
        S = torch.diag(self.log_std.exp())
        variance = torch.diag((S @ draws["W"] @ S.T).diagonal().clamp(min=1e-3))  # Σ
        self.variance = variance
        root = torch.linalg.cholesky(variance.float()).to(variance.dtype)
        noise = self.sample_scale * torch.nan_to_num(torch.einsum("nir,rp->nip", draws["z"], root), nan=1e-3)
        a = self.log_concentration.exp().clamp(min=1e-6)
        N = self.samples
        mu = a.log() - a.log().mean()
        laplace = (1 / a * (1 - 2 / N) + (1 / a).sum() / N**2).clamp(min=1e-6)  # the Laplace covariance's diagonal
        L = torch.linalg.cholesky((torch.diag(laplace) + 1e-6 * torch.eye(N, dtype=a.dtype)).float()).to(a.dtype)
        mixture = torch.softmax(L @ draws["zeta"] + mu, dim=-1)  # π
        self.mixture = mixture
        return torch.einsum("n,nir->ri", mixture, noise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.merged:
            return super().forward(x)
        A = self.A + self.perturbation()  # Σ_n π_n (Aᵀ + ε_n), transposed: A + Σ_n π_n ε_nᵀ
        update = (self.dropout(x).to(A.dtype) @ A.T) @ self.B.T
        return self.base(x) + (self.scale * update).to(x.dtype)

    def variational_loss(self) -> torch.Tensor:
        """λ (KL_Dirichlet + KL_Wishart + N · KL_Gaussian) (+ Σ π² with `entropy`); 0 at evaluation."""
        if not self.training:
            return torch.zeros(())
        a, prior = self.log_concentration.exp(), torch.full((self.samples,), self.dirichlet_prior)
        dirichlet = torch.distributions.kl_divergence(
            torch.distributions.Dirichlet(a), torch.distributions.Dirichlet(prior)
        )
        p = self.r
        scale = self.log_std.exp().square()  # the diagonal of S Sᵀ
        wishart = 0.5 * (-scale.log().sum() * p + scale.sum() * p - p**2)
        variance = self.variance.clamp(min=1e-6)
        gaussian = self.samples * 0.5 * (variance.trace() - variance.diagonal().log().sum() - p)
        loss = self.kl_weight * (dirichlet + wishart + gaussian)
        return loss + (self.mixture**2).sum() if self.entropy else loss


def monteclora_penalty(model: nn.Module) -> torch.Tensor:
    """The mean over the MonteCLoRA layers of their variational losses (to add to the task loss)."""
    losses = [layer.variational_loss() for layer in model.modules() if isinstance(layer, MonteCLoRALinear)]
    return torch.stack(losses).mean() if losses else torch.zeros(())


def inject_monteclora(
    model: nn.Module, target_names: list[str], r: int = 8, alpha: float = 16.0, **options
) -> list[str]:
    """MonteCLoRA on the named nn.Linear layers (options: samples, dirichlet_prior, sample_scale, kl_weight,
    entropy, buffer_size, dropout, use_rslora); A, B, σ and κ train."""
    targets = find_targets(model, target_names)
    for name in targets:
        replace_module(model, name, MonteCLoRALinear(model.get_submodule(name), r, alpha, **options))
    freeze_all_but(model, MonteCLoRALinear, ("A", "B", "log_std", "log_concentration"))
    return targets


def demo() -> None:
    """MonteCLoRA (8 samples, its regulariser) on the toy task; at evaluation it is LoRA and merges as LoRA."""
    x, y = toy_task()
    model = toy_model()
    inject_monteclora(model, ["0", "2", "4"], r=8, alpha=8, sample_scale=1e-2)
    before, after = train(model, x, y, lr=1e-2, penalty=monteclora_penalty)
    report("monteclora (r = 8, 8 samples)", model, before, after)
    report_merge(model.eval(), x, merge_lora)


if __name__ == "__main__":
    demo()
