"""Integrations with model libraries (imported on demand; nothing here is a hard dependency).

* :mod:`anchor_ext.integrations.transformers`: the ``"anchor"`` attention backend for
  Hugging Face transformers.
"""
