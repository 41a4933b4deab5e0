"""The catalog's controlled vocabularies, defined in one place: sections, kinds and tags.

Everything that names a section, kind or tag (the schema, the site, the README list, `catalog add`)
reads it from here, so adding a tag is a one-line change in this file.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Section:
    name: str  # the value written in papers.yaml, e.g. "NLP / Methods"
    title: str  # how the site shows it
    slug: str  # its page name


# In the order the site and the README list show them (the seed list's order).
SECTIONS: tuple[Section, ...] = (
    Section("Frameworks and Tools", "Frameworks and Tools", "frameworks-and-tools"),
    Section("Surveys", "Surveys", "surveys"),
    Section("NLP / Methods", "Natural Language Processing: Methods", "nlp-methods"),
    Section("NLP / Composition Methods", "Natural Language Processing: Composition Methods", "nlp-composition"),
    Section("NLP / Analysis and Evaluation", "Natural Language Processing: Analysis and Evaluation", "nlp-analysis"),
    Section("NLP / Applications", "Natural Language Processing: Applications", "nlp-applications"),
    Section("NLP / Serving", "Natural Language Processing: Serving", "nlp-serving"),
    Section("Computer Vision / Methods", "Computer Vision: Methods", "vision-methods"),
    Section("Audio / Applications", "Audio Processing: Applications", "audio-applications"),
    Section("Multi-Modal / Methods", "Multi-Modal: Methods", "multimodal-methods"),
)
SECTION_BY_NAME = {section.name: section for section in SECTIONS}

KINDS: dict[str, str] = {
    "method": "proposes a fine-tuning method",
    "system": "a system or kernel that trains or serves adapters efficiently",
    "framework": "a library or framework for using adapters",
    "survey": "a survey or taxonomy of methods",
    "study": "an empirical analysis of existing methods",
}

# How an entry of each kind relates to the reference implementations it links to, as its page says:
# a method's module implements it; a framework provides methods; a survey describes them; a study uses
# them. Methods and systems are confirmed by a module's IMPLEMENTS, the others by its COVERED_BY.
LINK_KINDS: dict[str, str] = {
    "method": "implements",
    "system": "implements",
    "framework": "provides",
    "survey": "describes",
    "study": "uses",
}
CONFIRMED_BY: dict[str, str] = {
    kind: "IMPLEMENTS" if link == "implements" else "COVERED_BY" for kind, link in LINK_KINDS.items()
}

# Method families first, then the cross-cutting topics that readers browse by.
TAGS: dict[str, str] = {
    "Bottleneck adapter": "Small down-projection, nonlinearity, up-projection modules inserted into each layer.",
    "LoRA": "A trainable low-rank update BA added to frozen weight matrices.",
    "High-rank update": "Updates of higher rank than BA from few numbers: Hadamard, Kronecker products, shared bases.",
    "Orthogonal fine-tuning": "Multiplying frozen weights by learned orthogonal matrices (rotations, reflections).",
    "Subspace fine-tuning": "Updates confined to, or projected out of, a subspace of the frozen weight.",
    "Transformed-domain update": "Updates trained as a few coefficients in a Fourier, wavelet or circulant domain.",
    "Prompt tuning": "Trainable soft-prompt vectors prepended to the input embeddings.",
    "Prefix tuning": "Trainable key and value prefixes in the attention of every layer.",
    "Sparse fine-tuning": "Updating a small, sparse subset of the existing weights (biases, masks, lottery tickets).",
    "Activation scaling": "Learned vectors that rescale inner activations.",
    "Hypercomplex": "Adapter weights built as sums of Kronecker products.",
    "Representation fine-tuning": "Learned interventions on hidden representations rather than weights.",
    "Hypernetwork": "A shared network that generates adapter weights from task, language or layer embeddings.",
    "Composition": "Combining several trained adapters: stacking, fusion, ensembling.",
    "Model merging": "Combining trained modules by arithmetic in weight space.",
    "Mixture of experts": "Routing between several adapters per task, token or input.",
    "Side network": "A separate small network running beside the frozen backbone.",
    "Conv adapter": "Adapters for convolutional networks.",
    "Quantisation": "Adapters trained on top of a quantised base model.",
    "Memory-efficient training": "Cutting what training keeps (activations, optimiser moments) rather than parameters.",
    "Serving": "Systems that serve many adapters on shared hardware.",
    "Unified framework": "Frameworks that unify, combine or search over PEFT designs.",
    "Conditional computation": "Skipping or dropping computation to make adapted models faster.",
    "Multilingual": "Cross-lingual transfer and adaptation to new languages.",
    "Machine translation": "Adapters for neural machine translation.",
    "Speech": "Adapters for speech recognition and speech translation.",
    "Knowledge injection": "Adapters that add factual or commonsense knowledge to a model.",
    "Instruction tuning": "Adapting large language models to follow instructions.",
}


# The families of the reference implementations, in the order the implementations index lists them.
# Each module under reference_impls/ names its family with `FAMILY = "..."`; catalog check refuses others.
IMPL_FAMILIES: dict[str, str] = {
    "Low-rank updates": "A trained low-rank change of frozen weights, merged into them after training.",
    "Hadamard and Kronecker products": "Weight updates from elementwise or Kronecker products of small factors.",
    "Orthogonal and rotational updates": "Frozen weights or features multiplied by learned rotations and reflections.",
    "Subspace updates": "Updates confined to, or projected out of, a subspace of the frozen weight.",
    "Transformed-domain updates": "Weight updates as a few coefficients in a Fourier, wavelet or circulant domain.",
    "Activation scaling": "Learned vectors that rescale activations inside the frozen network.",
    "Bottleneck adapters": "Small trained modules inserted into every layer, for Transformers and ConvNets.",
    "Prompts and prefixes": "Trained vectors prepended to the input or to the attention's keys and values.",
    "Representation fine-tuning": "Interventions on hidden states instead of weights.",
    "Sparse fine-tuning": "Training a small, chosen subset of the existing weights.",
    "Embeddings and vocabularies": "Adapting the embedding matrix to new vocabularies.",
    "Composition and merging": "Combining trained adapters: stacking, fusion, ensembles, arithmetic.",
    "Mixtures and routing": "Several adapters mixed per task or token by a learned router.",
    "Hypernetworks": "One network that generates the adapters' weights.",
    "Side networks": "A small network beside the frozen backbone.",
    "Unified designs and search": "Combinations of methods, and searches over them.",
    "Kernels and serving systems": "GPU kernels and systems that train and serve adapters fast.",
    "Interoperability with PEFT": "Loading and saving the checkpoints of HF PEFT.",
}
