"""A chat template or tokenizer other than the model's own (vLLM's --chat-template, --tokenizer)."""
from __future__ import annotations

import os

from .config import ConfigError


def tokenizer_from(path: str):
    """The tokenizer in directory `path` (tokenizer.json, tokenizer_config.json, ...)."""
    from .models.tokenizer import from_directory

    tok = from_directory(path) if os.path.isdir(path) else None
    if tok is None:
        raise ConfigError("tokenizer", f"{path!r} is not a directory with tokenizer files (tokenizer.json, "
                                       "tokenizer_config.json, vocab.json or tokenizer.model)")
    return tok


def set_chat_template(tokenizer, template: str) -> None:
    """Use `template` (Jinja text, or the path of a file holding it) for this tokenizer's chats."""
    if os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            template = f.read()
    elif "{{" not in template and "{%" not in template:
        raise ConfigError("chat_template", f"{template!r} is neither a file nor a Jinja template")
    hf = getattr(tokenizer, "tok", None)
    if hf is None:
        raise ConfigError("chat_template", "needs a transformers tokenizer (this model has none; see --tokenizer)")
    hf.chat_template = template


def tokenizer_for(source, config):
    """The tokenizer a deployment serves with (the model's own, or config.tokenizer's), with
    config.chat_template when one is given."""
    from .models.loader import load_tokenizer

    tok = load_tokenizer(source) if config.tokenizer is None else tokenizer_from(config.tokenizer)
    if config.chat_template is not None:
        set_chat_template(tok, config.chat_template)
    return tok
