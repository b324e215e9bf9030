"""Bad models and bad requests: a clear error naming the problem, nothing half-loaded."""
import json

import pytest

from dejavu import LLM, ModelError, RequestError, SamplingParams
from hf_models import save_hf_model


def test_unknown_model_name():
    with pytest.raises(ModelError, match="unknown model 'no-such-model'"):
        LLM(device="cpu", model="no-such-model")
    with pytest.raises(ModelError, match="unknown random model 'gpt9'"):
        LLM(device="cpu", model="random:gpt9")


def test_directory_without_weights(tmp_path):
    save_hf_model("gpt2", tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelError, match="no \\*.safetensors or pytorch_model"):
        LLM(device="cpu", model=str(tmp_path))


def test_directory_without_config(tmp_path):
    save_hf_model("gpt2", tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelError, match="no config.json"):
        LLM(device="cpu", model=str(tmp_path))


def test_truncated_weight_file(tmp_path):
    save_hf_model("opt", tmp_path)
    (f,) = tmp_path.glob("*.safetensors")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cannot read weight file .*model.safetensors"):
        LLM(device="cpu", model=str(tmp_path))


def test_config_that_does_not_match_the_weights(tmp_path):
    save_hf_model("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="has shape .* but the config expects"):
        LLM(device="cpu", model=str(tmp_path))


def test_weights_missing_from_checkpoint(tmp_path):
    save_hf_model("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # the checkpoint has 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="missing .* weight"):
        LLM(device="cpu", model=str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ModelError, match="unsupported model_type 't5'"):
        LLM(device="cpu", model=str(tmp_path))


def test_missing_and_foreign_gguf(tmp_path):
    with pytest.raises(ModelError, match="GGUF file not found"):
        LLM(device="cpu", model=str(tmp_path / "x.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelError, match="cannot read GGUF file"):
        LLM(device="cpu", model=str(bad))


@pytest.fixture(scope="module")
def tiny():
    return LLM(device="cpu", model="random:gpt2-tiny", block_size=4, kv_cache_blocks=64, max_model_len=128)


def test_prompt_too_long_for_context(tiny):
    with pytest.raises(RequestError, match="exceeds the model's context length of 128"):
        tiny.generate([[5] * 120], SamplingParams(max_tokens=20))
    # The engine is still usable and nothing leaked.
    assert tiny.engine.cache.allocator.num_used == 0
    assert len(tiny.generate([[5] * 10], SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids) == 3


def test_request_larger_than_the_cache():
    llm = LLM(device="cpu", model="random:gpt2-tiny", block_size=4, kv_cache_blocks=8)
    with pytest.raises(RequestError, match="needs 10 KV blocks but the cache holds only 8"):
        llm.generate([[5] * 30], SamplingParams(max_tokens=10))


def test_bad_requests(tiny):
    with pytest.raises(RequestError, match="empty"):
        tiny.generate([[]], SamplingParams())
    with pytest.raises(RequestError, match="token ids must be in"):
        tiny.generate([[1, 10**9]], SamplingParams())
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        tiny.generate(["hi"], SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="2 prompts but 1 sampling"):
        tiny.generate(["a", "b"], [SamplingParams()])


def test_unsupported_modes_are_refused():
    with pytest.raises(ValueError, match="swap"):
        LLM(device="cpu", model="random:gpt2-tiny", swap=True)


def test_bad_dtype_and_device():
    with pytest.raises(ModelError, match="unknown dtype 'float7'"):
        LLM(device="cpu", model="random:gpt2-tiny", dtype="float7")
    with pytest.raises(ValueError, match="device"):
        LLM(model="random:gpt2-tiny", device="tpu")
