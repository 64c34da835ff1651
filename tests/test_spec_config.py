"""Speculative decoding configuration: parsed from dict / JSON / CLI, bad keys named, off by default."""

import pytest

from pagellm.config import EngineConfig
from pagellm.entrypoints.cli import build_parser, engine_kwargs
from pagellm.spec_decode import SpeculativeConfig


def test_off_by_default():
    assert EngineConfig().speculative_config is None


def test_dict_and_json_give_the_same_config():
    as_dict = EngineConfig(speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5})
    as_json = EngineConfig(speculative_config='{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}')
    assert as_dict.speculative_config == as_json.speculative_config
    assert as_dict.speculative_config.num_speculative_tokens == 3
    assert as_dict.speculative_config.prompt_lookup_max == 5


def test_cli_flag():
    args = build_parser().parse_args(
        ["generate", "--speculative-config", '{"method": "draft_model", "model": "/m", "num_speculative_tokens": 2}', "hi"])
    config = EngineConfig(**engine_kwargs(args)).speculative_config
    assert config == SpeculativeConfig(method="draft_model", model="/m", num_speculative_tokens=2)


@pytest.mark.parametrize("value, key", [
    ({"metod": "ngram"}, "speculative_config.metod"),
    ({"method": "eagle"}, "speculative_config.method"),
    ({"num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
    ({"num_speculative_tokens": True}, "speculative_config.num_speculative_tokens"),
    ({"prompt_lookup_min": 4, "prompt_lookup_max": 2}, "speculative_config.prompt_lookup_max"),
    ({"method": "draft_model"}, "speculative_config.model"),
    ({"method": "ngram", "model": "/m"}, "speculative_config.model"),
    ({"min_acceptance_rate": 1.5}, "speculative_config.min_acceptance_rate"),
    ({"disable_by_batch_size": -1}, "speculative_config.disable_by_batch_size"),
    ("{not json", "speculative_config"),
    ([1, 2], "speculative_config"),
])
def test_bad_config_names_the_key(value, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        EngineConfig(speculative_config=value)


def test_refused_with_pipeline_parallelism_only():
    config = EngineConfig(speculative_config={"method": "ngram"})
    assert config.resolve(model_max_len=2048, cuda_available=False).speculative_config.method == "ngram"
    staged = EngineConfig(speculative_config={"method": "ngram"}, pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="speculative_config.*pipeline_parallel_size"):
        staged.resolve(model_max_len=2048, cuda_available=False)


def test_draft_token_cost_defaults_by_device_and_is_validated():
    from pagellm.spec_decode.config import DRAFT_TOKEN_COST, SpeculativeConfig

    config = SpeculativeConfig.from_dict({"method": "ngram"})
    assert config.resolved_draft_token_cost("cpu") == DRAFT_TOKEN_COST["cpu"] > 0
    assert config.resolved_draft_token_cost("cuda") == DRAFT_TOKEN_COST["cuda"]
    assert SpeculativeConfig.from_dict({"draft_token_cost": 0}).resolved_draft_token_cost("cpu") == 0.0
    for bad in (-0.1, "0.2", True, float("inf")):
        with pytest.raises(ValueError, match="speculative_config.draft_token_cost"):
            SpeculativeConfig.from_dict({"draft_token_cost": bad})
