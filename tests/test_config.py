"""One configuration: every bad value or combination is refused by config.py, before anything
starts, with an error that begins with the field at fault."""
import pytest

from dejavu import LLM, Config, ConfigError
from dejavu.config import ServerConfig


def config(**kwargs):
    return Config.from_kwargs(model="random:gpt2-tiny", device="cpu", **kwargs)


BAD = [
    # (LLM() arguments, the field named, words of the problem)
    (dict(block_size=0), "block_size", "must be an integer >= 1"),
    (dict(kv_cache_blocks=-1), "num_blocks", "must be an integer >= 0"),
    (dict(max_num_seqs=0), "max_num_seqs", ">= 1"),
    (dict(admission="fifo"), "admission", "must be 'greedy' or 'reserve', got 'fifo'"),
    (dict(pp=9), "pp", "must be an integer from 1 to 8, got 9"),
    (dict(tp=0), "tp", "must be an integer from 1 to 8"),
    (dict(pp=2.0), "pp", "must be an integer"),
    (dict(microbatch_size=-1), "microbatch_size", ">= 0"),
    (dict(launcher="ssh"), "launcher", "one of 'local', 'mpirun', 'external'"),
    (dict(prompt_stages=1), "token_stages", "go together"),
    (dict(token_stages=2), "prompt_stages", "go together"),
    (dict(prompt_stages=1, token_stages=9), "token_stages", "from 1 to 8"),
    (dict(prompt_stages=1, token_stages=1, pp=2), "pp", "leave pp at 1"),
    (dict(prompt_stages=1, token_stages=1, kv_receive_slots=0), "kv_receive_slots", ">= 1"),
    (dict(prompt_stages=1, token_stages=1, kv_transport="pigeon"), "kv_transport", "got 'pigeon'"),
    (dict(prompt_stages=1, token_stages=1, admission="reserve"), "admission", "not yet available with prompt_stages"),
    (dict(swap=True), "swap", "needs a pipeline of pp >= 2"),
    (dict(swap=True, prompt_stages=1, token_stages=1), "swap", "token_stages >= 2 with disaggregation"),
    (dict(swap=True, prompt_stages=1, token_stages=2, kv_transport="ipc"), "kv_transport", "shm or tcp"),
    (dict(pp=2, swap=True, resident_microbatches=0), "resident_microbatches", "an integer >= 1"),
    (dict(replicate=True), "replicate", "pp >= 2"),
    (dict(pp=2, replicate=True, replicas=2), "replicas", "at most 1 with 2 stages"),
    (dict(pp=3, replicas=2), "replicas", "needs replicate=True"),
    (dict(replicate_dir="/tmp/x"), "replicate_dir", "needs replicate=True"),
    (dict(replicate_to=[1, 0]), "replicate_to", "needs replicate=True"),
    (dict(pp=2, replicate=True, replicate_to=[0, 1]), "replicate_to", "another stage in [0, 2)"),
    (dict(pp=3, replicate=True, replicate_to=[1, 0]), "replicate_to", "each of the 3 stages"),
    (dict(prompt_stages=1, token_stages=2, replicate=True, replicate_to=[1, 2]), "replicate_to", "[0, 2)"),
    (dict(pp=2, replicate=True, recovery="off"), "recovery", "replicate needs recovery"),
    (dict(pp=2, recovery="sometimes"), "recovery", "got 'sometimes'"),
    (dict(heartbeat_interval=0), "heartbeat_interval", "> 0"),
    (dict(heartbeat_interval=2.0, heartbeat_timeout=1.0), "heartbeat_timeout", "above heartbeat_interval"),
    (dict(spare_workers=-1), "spare_workers", ">= 0"),
    (dict(worker_timeout=float("inf")), "worker_timeout", "finite number > 0"),
]


@pytest.mark.parametrize("kwargs,name,problem", BAD, ids=[str(b[0]) for b in BAD])
def test_each_bad_value_names_its_field(kwargs, name, problem):
    with pytest.raises(ConfigError) as e:
        config(**kwargs).validate()
    assert e.value.field == name
    assert str(e.value).startswith(f"{name}: ") and problem in str(e.value)


def test_llm_refuses_before_loading_anything():
    # a model that does not exist: the configuration is refused first, so its error is the one raised
    with pytest.raises(ConfigError, match="^pp: must be an integer from 1 to 8"):
        LLM(model="random:no-such-model", device="cpu", pp=9)


def test_good_configurations_pass_and_sort_into_records():
    c = config(pp=2, replicate=True, replicate_to=[1, 0], block_size=4, kv_cache_blocks=64, swap=False).validate()
    assert (c.parallel.pp, c.engine.block_size, c.engine.num_blocks) == (2, 4, 64)
    assert c.replication.replicate_to == [1, 0] and c.distributed and c.kv_stages() == 2
    c = config(prompt_stages=1, token_stages=2, swap=True, kv_transport="shm").validate()
    assert c.disagg.enabled and c.kv_stages() == 2 and c.swap.swap
    # recovery is on by default for every layout, tensor parallelism included
    assert config(pp=2, tp=2, replicate=True).validate().replication.resolved_recovery("local") == "respawn"
    assert not config().validate().distributed


def test_unknown_argument_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'pipeline'"):
        config(pipeline=2)


def test_llm_from_config_runs_the_same_engine():
    from dejavu import SamplingParams

    c = config(block_size=4, kv_cache_blocks=32, max_model_len=64)
    sp = SamplingParams(max_tokens=4, ignore_eos=True)
    a = LLM.from_config(c).generate([[5, 6, 7]], sp)[0].token_ids
    b = LLM(model="random:gpt2-tiny", device="cpu", block_size=4, kv_cache_blocks=32, max_model_len=64).generate(
        [[5, 6, 7]], sp)[0].token_ids
    assert a == b and len(a) == 4
    assert c.engine.kv_cache_memory == 0  # the LLM filled its defaults into a copy


@pytest.mark.parametrize("kwargs,name", [(dict(port=70000), "port"), (dict(max_queue=0), "max_queue"),
                                         (dict(header_timeout=0.0), "header_timeout"),
                                         (dict(body_timeout=float("nan")), "body_timeout"),
                                         (dict(max_body_bytes=0), "max_body_bytes")])
def test_server_config(kwargs, name):
    with pytest.raises(ConfigError, match=f"^{name}: must be"):
        ServerConfig(**kwargs).validate()
    assert ServerConfig().validate().host == "127.0.0.1"
