"""Property tests: the config loader returns a MergeConfig or raises ConfigError, whatever the input."""

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowmem_moe.config import EXPERT_KEYS, TOP_LEVEL_KEYS, MergeConfig, load_merge_config
from lowmem_moe.errors import ConfigError

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
KEYS = st.sampled_from(TOP_LEVEL_KEYS + EXPERT_KEYS + ("postive_prompts", "gate", "")) | st.text(max_size=10)
EXPERTS = st.lists(
    st.dictionaries(st.sampled_from(EXPERT_KEYS) | st.text(max_size=6), VALUES, max_size=5), max_size=3
)
DOCUMENTS = st.dictionaries(KEYS, VALUES, max_size=7) | st.fixed_dictionaries(
    {"base_model": st.text(min_size=1, max_size=10), "experts": EXPERTS},
    optional={
        "gate_mode": st.sampled_from(["hidden", "random", "cheap_embed", "bogus"]) | st.text(max_size=5),
        "experts_per_token": VALUES,
        "dtype": st.sampled_from(["bfloat16", "float16", "int8"]) | VALUES,
    },
)


def load(tmp_path: Path, data: bytes):
    path = tmp_path / "merge.yml"
    path.write_bytes(data)
    try:
        return load_merge_config(path)
    except ConfigError:
        return None


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(document=DOCUMENTS)
def test_structured_yaml_loads_or_config_error(tmp_path, document):
    text = yaml.safe_dump(document, allow_unicode=True)
    result = load(tmp_path, text.encode("utf-8"))
    assert result is None or isinstance(result, MergeConfig)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_load_or_config_error(tmp_path, data):
    result = load(tmp_path, data)
    assert result is None or isinstance(result, MergeConfig)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("abc:-[]{}\"'&*!|>%@`#, \n\t0123")), max_size=120))
def test_yaml_punctuation_load_or_config_error(tmp_path, text):
    result = load(tmp_path, text.encode("utf-8"))
    assert result is None or isinstance(result, MergeConfig)
