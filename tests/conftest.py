"""Tiny models of every registered family, built from transformers configs in-process (no downloads), with
outlier channels injected the way real LLMs have them: a few norm-weight channels ×40, so a few activation
channels are far larger than the rest and naive per-tensor INT8 loses the others."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

VOCAB = 256
HIDDEN = 64
OUTLIER_CHANNELS = (3, 17, 41)
OUTLIER_GAIN = 40.0


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


FAMILIES = ["opt", "bloom", "llama", "gpt2", "glm", "gemma3", "qwen3", "phi3", "gpt_neox"]


@torch.no_grad()
def inject_outliers(model, fam) -> None:
    """Scale a few channels of every smoothing norm's gain (and β) ×40, as OPT's LayerNorms do. The gain is γ, or
    1+γ for a family whose norms compute (1+γ)·f(x) (Gemma: norm_form "one_plus_gamma")."""
    g = torch.Generator().manual_seed(1)
    for grp in fam.groups():
        norm = model.get_submodule(grp.source)
        norm.weight.add_(0.2 * torch.randn(norm.weight.shape, generator=g))
        ch = list(OUTLIER_CHANNELS)
        if fam.norm_form == "one_plus_gamma":
            norm.weight[ch] = (1.0 + norm.weight[ch]) * OUTLIER_GAIN - 1.0
        else:
            norm.weight[ch] *= OUTLIER_GAIN
        if getattr(norm, "bias", None) is not None:
            norm.bias.add_(0.1 * torch.randn(norm.bias.shape, generator=g))
            norm.bias[list(OUTLIER_CHANNELS)] *= OUTLIER_GAIN


def make_tiny(family: str, outliers: bool = True, seed: int = 0):
    from transformers import AutoModelForCausalLM

    from sq_export.families import family_for

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager").eval()
    fam = family_for(model)
    if outliers:
        inject_outliers(model, fam)
    return model, fam


def token_batches(n=8, seq=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (n, seq), generator=g).numpy()


@pytest.fixture(params=FAMILIES)
def family_name(request):
    return request.param


def train_tokenizer(vocab_size: int = VOCAB):
    """A byte-level BPE trained in-process on the shipped calibration text (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sq_export.textdata import DEFAULT_CALIB

    text = DEFAULT_CALIB.read_text()[:200_000]
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


_TOK = {}


def tokenizer():
    if "t" not in _TOK:
        _TOK["t"] = train_tokenizer(VOCAB + 64)  # byte alphabet (256) + merges; ids past VOCAB are clipped below
    return _TOK["t"]


def save_tiny(family: str, path, outliers=True, seed=0):
    """A tiny model folder (config, safetensors, tokenizer) that `sq-export MODEL` commands load."""
    model, fam = make_tiny_vocab(family, outliers, seed)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer().save_pretrained(path)
    return model, fam


def make_tiny_vocab(family, outliers=True, seed=0):
    cfg = tiny_config(family)
    cfg.vocab_size = len(tokenizer())
    from transformers import AutoModelForCausalLM

    from sq_export.families import family_for

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    fam = family_for(model)
    if outliers:
        inject_outliers(model, fam)
    return model, fam


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One saved tiny model folder per family (built lazily)."""
    cache = {}

    def get(family):
        if family not in cache:
            d = tmp_path_factory.mktemp(f"tiny_{family}")
            save_tiny(family, d)
            cache[family] = d
        return cache[family]

    return get


@pytest.fixture(scope="session")
def small_text(tmp_path_factory):
    from sq_export.textdata import DEFAULT_CALIB, DEFAULT_HELDOUT

    d = tmp_path_factory.mktemp("text")
    (d / "calib.txt").write_text(DEFAULT_CALIB.read_text()[:20000])
    (d / "eval.txt").write_text(DEFAULT_HELDOUT.read_text()[:8000])
    return d
