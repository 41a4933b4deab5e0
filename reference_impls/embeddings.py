"""Adapting a multilingual model's embeddings to a new script and vocabulary: UNKs Everywhere.

Pfeiffer, Vulić, Gurevych, Ruder. "UNKs Everywhere: Adapting Multilingual Language Models to New
Scripts." EMNLP 2021 (2021.emnlp-main.800). A language whose script the pretrained vocabulary barely
covers turns into unknown tokens; it needs a vocabulary (a tokenizer) of its own, and new embeddings
for it. Training a full |V'| × d embedding matrix for a low-resource language is costly, so the
pretrained embeddings E ∈ ℝ^{|V|×d} are factorised into token-specific vectors and a shared
up-projection, and only token-specific vectors are learned for the new vocabulary:

    E ≈ I F,    I = U_{d'} S_{d'} ∈ ℝ^{|V|×d'},   F = V_{d'}ᵀ ∈ ℝ^{d'×d}       (truncated SVD, d' < d)
    E' = I' F,  I' ∈ ℝ^{|V'|×d'} trained,  F kept

I' starts from lexical overlap (the paper's EL-lex): the row of a token that the old vocabulary has
too is copied from I; the others (and, for EL-rand, all rows) are drawn from a normal with I's mean
and standard deviation per dimension. Trainable: |V'|·d' instead of |V'|·d. The language's adapters
are MAD-X's (composition.py), in "MAD-X 2.0" form: no adapter in the last layer, which the paper found
better for transfer (`inject_madx2_adapters`). We could not check here how the paper initialises the
rows without overlap (mean and spread of I per dimension is our choice), nor whether it trains F.
"""

import torch
from torch import nn

from reference_impls._plumbing import count_parameters, find_targets, tiny_encoder, train_classifier
from reference_impls.bottleneck import PFEIFFER, inject_adapters

FAMILY = "Embeddings and vocabularies"

IMPLEMENTS = ("unks-everywhere",)


def factorize(embeddings: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(I, F) with I F the best rank-`rank` approximation of the embedding matrix (Eckart-Young)."""
    exact = embeddings if embeddings.dtype in (torch.float32, torch.float64) else embeddings.float()  # no 16-bit SVD
    U, S, Vh = torch.linalg.svd(exact, full_matrices=False)
    return (U[:, :rank] * S[:rank]).to(embeddings.dtype), Vh[:rank].to(embeddings.dtype)


class FactorizedEmbedding(nn.Module):
    """E'[ids] = I'[ids] F: trainable token vectors I', the frozen shared up-projection F."""

    def __init__(self, token_vectors: torch.Tensor, projection: torch.Tensor, padding_idx: int | None = None):
        super().__init__()
        self.token_vectors = nn.Parameter(token_vectors.clone())  # I'
        self.register_buffer("projection", projection.clone())  # F
        self.padding_idx = padding_idx

    @property
    def weight(self) -> torch.Tensor:
        """The full |V'| × d matrix I' F (for tied output embeddings)."""
        return self.token_vectors @ self.projection

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_vectors[ids] @ self.projection


def new_token_vectors(
    old_vectors: torch.Tensor,
    old_vocabulary: dict[str, int],
    new_vocabulary: dict[str, int],
    lexical: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """I' for new_vocabulary (token → id): rows of shared tokens copied from I (lexical=True, EL-lex),
    all others drawn from N(mean, std) of I per dimension (all of them with lexical=False, EL-rand)."""
    generator = torch.Generator(device=old_vectors.device).manual_seed(seed)
    mean, std = old_vectors.mean(0), old_vectors.std(0)
    rows = torch.randn(len(new_vocabulary), old_vectors.shape[1], generator=generator, device=old_vectors.device)
    vectors = rows.to(old_vectors.dtype) * std + mean
    if lexical:
        for token, new_id in new_vocabulary.items():
            if token in old_vocabulary:
                vectors[new_id] = old_vectors[old_vocabulary[token]]
    return vectors


def adapt_to_new_vocabulary(
    model: nn.Module,
    old_vocabulary: dict[str, int],
    new_vocabulary: dict[str, int],
    rank: int,
    lexical: bool = True,
) -> FactorizedEmbedding:
    """Give a Hugging Face model the factorised embeddings of a new vocabulary (its input embeddings
    replaced); only I' of them is trainable. The rest of the model's trainability is left as it is."""
    old = model.get_input_embeddings()
    I, F = factorize(old.weight.detach(), rank)
    embedding = FactorizedEmbedding(new_token_vectors(I, old_vocabulary, new_vocabulary, lexical), F)
    model.set_input_embeddings(embedding)
    return embedding


def inject_madx2_adapters(model: nn.Module, target_names: list[str], m: int = 64) -> list[str]:
    """MAD-X 2.0's language adapters: Pfeiffer adapters at the named places of every layer but the
    last (the last match in module order is left out). Freezes all but the adapters."""
    targets = find_targets(model, target_names, kind=nn.Module)[:-1]
    return inject_adapters(model, targets, m=m, **PFEIFFER)


def demo() -> None:
    """A frozen tiny BERT meets a "new language": a vocabulary of 60 tokens of which 25 (token 7 among
    them) the model's own 50 also have. The task is still: is token 7 in the sequence?"""
    old = {f"t{i}": i for i in range(50)}
    new = {f"t{i}": i for i in range(25)} | {f"new{i}": 25 + i for i in range(35)}
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(8, 60, (192, 8), generator=generator)
    labels = torch.randint(0, 2, (192,), generator=generator)
    ids[labels.bool(), torch.randint(0, 8, (int(labels.sum()),), generator=generator)] = 7
    for lexical, name in ((True, "EL-lex"), (False, "EL-rand")):
        model = tiny_encoder()
        inject_madx2_adapters(model, [f"encoder.layer.{i}.output" for i in range(2)], m=8)
        embedding = adapt_to_new_vocabulary(model, old, new, rank=16, lexical=lexical)
        before, after, _ = train_classifier(model, ids, labels, steps=60)
        trainable, total = count_parameters(model)
        print(
            f"UNKs Everywhere, {name} (d' = 16, {embedding.token_vectors.numel():,} token-vector parameters; "
            f"MAD-X 2.0 adapters, none in the last layer): {trainable:,} trainable of {total:,} parameters "
            f"({100 * trainable / total:.2f}%), plus the head"
        )
        print(f"loss on the new task: {before:.4g} before, {after:.4g} after training")


if __name__ == "__main__":
    demo()
