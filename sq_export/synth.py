"""Synthetic models of every registered family, built from transformers configs in-process (no downloads), with
outlier channels injected the way real LLMs have them: a few norm-weight channels ×40, so a few activation
channels are far larger than the rest and naive per-tensor INT8 loses the others.

    model, fam = make_tiny("llama")                       # the tests' tiny models (hidden 64, 2 layers)
    cfg = full_size_config("llama2-7b", layers=32)        # real shapes, random weights (benchmarks, big-model runs)

The tests, the benchmark-model builders in tools/ and the big-model device runs use these, so an "injected
outlier" means the same thing everywhere.
"""

from __future__ import annotations

VOCAB = 256
HIDDEN = 64
OUTLIER_CHANNELS = (3, 17, 41)
OUTLIER_GAIN = 40.0

FAMILIES = ["opt", "bloom", "llama", "gpt2", "glm", "gemma3", "qwen3", "phi3", "gpt_neox"]

# Real model shapes (random weights): what SmoothQuant is for. Layers can be cut for benchmarks.
FULL_SIZE = {
    "llama2-7b": dict(family="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama2-13b": dict(family="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
    "llama2-70b": dict(family="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
    "opt-6.7b": dict(family="opt", hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32,
                     word_embed_proj_dim=4096, vocab_size=50272, max_position_embeddings=2048),
}


def tiny_config(family: str):
    import transformers as T

    T.logging.set_verbosity_error()
    common = dict(vocab_size=VOCAB)
    if family == "opt":
        return T.OPTConfig(hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=HIDDEN, max_position_embeddings=512, pad_token_id=1, bos_token_id=2, eos_token_id=2, **common)
    if family == "bloom":
        return T.BloomConfig(hidden_size=HIDDEN, n_layer=2, n_head=4, pad_token_id=3, bos_token_id=1, eos_token_id=2, **common)
    if family == "llama":
        return T.LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, **common)
    if family == "gpt2":
        return T.GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=512, bos_token_id=1, eos_token_id=2, **common)
    if family == "glm":
        return T.GlmConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=[2], **common)
    if family == "gemma3":  # one sliding (window 4) and one global layer; query_pre_attn_scalar != head_dim
        return T.Gemma3TextConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=4, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, **common)
    if family == "qwen3":
        return T.Qwen3Config(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, **common)
    if family == "phi3":
        return T.Phi3Config(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, original_max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, **common)
    if family == "gpt_neox":  # Pythia: parallel residual, partial rotary
        return T.GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512, use_parallel_residual=True, bos_token_id=1, eos_token_id=2, **common)
    if family == "gpt_neox_seq":  # the sequential residual form (use_parallel_residual=False), same adapter
        return T.GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512, use_parallel_residual=False, bos_token_id=1, eos_token_id=2, **common)
    raise KeyError(family)


def full_size_config(name: str, layers: int | None = None, vocab: int | None = None):
    """The transformers config of a real model shape (FULL_SIZE), optionally with fewer layers / another vocab."""
    import transformers as T

    if name not in FULL_SIZE:
        from sq_export.errors import BadInput

        raise BadInput(f"unknown model shape {name!r}: choose one of {', '.join(FULL_SIZE)}")
    kw = dict(FULL_SIZE[name])
    family = kw.pop("family")
    if layers:
        kw["num_hidden_layers"] = layers
    if vocab:
        kw["vocab_size"] = vocab
    if family == "llama":
        return T.LlamaConfig(bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5, tie_word_embeddings=False, **kw)
    if family == "opt":
        return T.OPTConfig(pad_token_id=1, bos_token_id=2, eos_token_id=2, do_layer_norm_before=True, **kw)
    raise KeyError(family)


def inject_outliers(model, fam, channels=OUTLIER_CHANNELS, gain: float = OUTLIER_GAIN, seed: int = 1) -> None:
    """Scale a few channels of every smoothing norm's gain (and β) ×`gain`, as OPT's LayerNorms do. The gain is γ, or
    1+γ for a family whose norms compute (1+γ)·f(x) (Gemma: norm_form "one_plus_gamma")."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for grp in fam.groups():
            norm = model.get_submodule(grp.source)
            norm.weight.add_(0.2 * torch.randn(norm.weight.shape, generator=g).to(norm.weight.dtype))
            if fam.norm_form == "one_plus_gamma":
                norm.weight[list(channels)] = (1.0 + norm.weight[list(channels)]) * gain - 1.0
            else:
                norm.weight[list(channels)] *= gain
            if getattr(norm, "bias", None) is not None:
                norm.bias.add_(0.1 * torch.randn(norm.bias.shape, generator=g).to(norm.bias.dtype))
                norm.bias[list(channels)] *= gain


def from_config(cfg, outliers: bool = True, seed: int = 0):
    """(model, family) of `cfg` with seeded random weights (eval mode, eager attention), outliers injected."""
    import torch
    from transformers import AutoModelForCausalLM

    from sq_export.families import family_for

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    fam = family_for(model)
    if outliers:
        inject_outliers(model, fam)
    return model, fam


def make_tiny(family: str, outliers: bool = True, seed: int = 0, vocab_size: int | None = None):
    cfg = tiny_config(family)
    if vocab_size:
        cfg.vocab_size = vocab_size
    return from_config(cfg, outliers, seed)


def train_tokenizer(vocab_size: int = VOCAB + 64, chars: int | None = 200_000):
    """A byte-level BPE trained in-process on the shipped calibration text (no downloads), at most `vocab_size`
    tokens (the text decides how many merges exist); `chars`: how much of the text (None: all of it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sq_export.textdata import DEFAULT_CALIB

    text = DEFAULT_CALIB.read_text()
    text = text[:chars] if chars else text
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def token_batches(n=8, seq=32, seed=0, vocab=VOCAB):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n, seq), generator=g).numpy()
