"""The merge YAML loader: schema errors, their positions, paths and prompt warnings."""

import logging
import os
from pathlib import Path

import pytest

from lowmem_moe.config import load_merge_config
from lowmem_moe.errors import ConfigError

TWO_RANDOM_EXPERTS = """\
base_model: base
gate_mode: random
experts:
  - source_model: expert_a
  - source_model: expert_b
"""


def write(folder: Path, text: str, name: str = "merge.yml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(folder: Path, text: str) -> str:
    """Load a YAML that must be rejected and return the error message."""
    with pytest.raises(ConfigError) as caught:
        load_merge_config(write(folder, text))
    return str(caught.value)


@pytest.fixture
def config_warnings(caplog, monkeypatch):
    """Capture the loader's warnings, even after the command line has set up its own handler."""
    # cli._configure_logging stops propagation from the package logger, which
    # would hide the records from caplog in a test run that called main().
    monkeypatch.setattr(logging.getLogger("lowmem_moe"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="lowmem_moe.config")
    return caplog


def warning_messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


def cheap_embed_yaml(prompt_lines_a: str, prompt_lines_b: str = '      - "integrals"') -> str:
    return (
        "base_model: base\n"
        "gate_mode: cheap_embed\n"
        "experts:\n"
        "  - source_model: expert_a\n"
        "    positive_prompts:\n"
        f"{prompt_lines_a}\n"
        "  - source_model: expert_b\n"
        "    positive_prompts:\n"
        f"{prompt_lines_b}\n"
    )


# Valid files.


def test_minimal_random_config_loads(tmp_path):
    config = load_merge_config(write(tmp_path, TWO_RANDOM_EXPERTS))
    assert config.gate_mode == "random"
    assert config.experts_per_token == 2
    assert len(config.experts) == 2
    assert config.experts[0].positive_prompts == ()
    assert config.dtype is None
    assert config.shared_experts == ()


def test_expert_line_numbers(tmp_path):
    config = load_merge_config(write(tmp_path, TWO_RANDOM_EXPERTS))
    assert config.experts[0].line == 4
    assert config.experts[1].line == 5


def test_cheap_embed_prompts_read(tmp_path):
    text = cheap_embed_yaml('      - "what\'s 2+2?"\n      - algebra') + "    negative_prompts:\n      - poetry\n"
    config = load_merge_config(write(tmp_path, text))
    assert config.experts[0].positive_prompts == ("what's 2+2?", "algebra")
    assert config.experts[1].positive_prompts == ("integrals",)
    assert config.experts[1].negative_prompts == ("poetry",)


def test_expert_numbers_read(tmp_path):
    text = TWO_RANDOM_EXPERTS + "    noise_scale: 0.01\n    residual_scale: 2\n"
    config = load_merge_config(write(tmp_path, text))
    assert config.experts[1].noise_scale == 0.01
    assert config.experts[1].residual_scale == 2.0
    assert config.experts[0].noise_scale is None


def test_utf8_bom_accepted(tmp_path):
    # Some Windows editors save UTF-8 with a byte order mark.
    path = tmp_path / "merge.yml"
    path.write_bytes(b"\xef\xbb\xbf" + TWO_RANDOM_EXPERTS.encode())
    assert load_merge_config(path).gate_mode == "random"


# Paths.


def test_relative_source_resolves_against_yaml_folder(tmp_path, monkeypatch):
    recipe_folder = tmp_path / "recipes"
    recipe_folder.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_merge_config(write(recipe_folder, TWO_RANDOM_EXPERTS.replace("expert_b", "../models/expert_b")))
    assert config.base_model == recipe_folder.resolve() / "base"
    assert config.experts[0].source_model == recipe_folder.resolve() / "expert_a"
    assert os.path.normpath(config.experts[1].source_model) == str(tmp_path.resolve() / "models" / "expert_b")


def test_relative_yaml_path_resolves_against_its_folder(tmp_path, monkeypatch):
    recipe_folder = tmp_path / "recipes"
    recipe_folder.mkdir()
    write(recipe_folder, TWO_RANDOM_EXPERTS)
    monkeypatch.chdir(tmp_path)

    config = load_merge_config(Path("recipes/merge.yml"))
    assert config.base_model == recipe_folder.resolve() / "base"


def test_absolute_source_kept(tmp_path):
    absolute = tmp_path / "models" / "expert_a"
    config = load_merge_config(write(tmp_path, TWO_RANDOM_EXPERTS.replace("expert_a", str(absolute))))
    assert config.experts[0].source_model == absolute


def test_source_reference_kept_as_written(tmp_path):
    config = load_merge_config(write(tmp_path, TWO_RANDOM_EXPERTS.replace("expert_a", "./models/a")))
    assert config.experts[0].source_reference == "./models/a"


# Unknown and duplicate keys.


def test_unknown_key_suggests_closest(tmp_path):
    message = load_error(tmp_path, TWO_RANDOM_EXPERTS + "experts_per_tokn: 1\n")
    assert "'experts_per_tokn'" in message
    assert message.endswith("Did you mean 'experts_per_token'?")
    assert "line 6, column 1" in message


def test_unknown_expert_key_suggests_closest(tmp_path):
    text = cheap_embed_yaml('      - "algebra"').replace(
        "  - source_model: expert_b\n    positive_prompts:", "  - source_model: expert_b\n    postive_prompts:"
    )
    message = load_error(tmp_path, text)
    assert "'postive_prompts'" in message
    assert message.endswith("Did you mean 'positive_prompts'?")
    assert "experts[1]" in message
    assert "line 8, column 5" in message


def test_unknown_key_without_close_match(tmp_path):
    message = load_error(tmp_path, TWO_RANDOM_EXPERTS + "zzz: 1\n")
    assert "'zzz'" in message
    assert "Did you mean" not in message
    assert message.endswith(".")


def test_duplicate_key_rejected(tmp_path):
    message = load_error(tmp_path, TWO_RANDOM_EXPERTS + "gate_mode: cheap_embed\n")
    assert "'gate_mode' appears twice" in message
    assert "line 6" in message


def test_duplicate_expert_key_rejected(tmp_path):
    message = load_error(tmp_path, TWO_RANDOM_EXPERTS + "    source_model: expert_c\n")
    assert "'source_model' appears twice" in message
    assert "experts[1]" in message


# YAML syntax and encoding.


def test_syntax_error_gives_line_and_column(tmp_path):
    message = load_error(tmp_path, "base_model: base\nexperts:\n  - source_model: [a\n")
    assert "YAML syntax error" in message
    assert "line 4" in message
    assert "column" in message
    assert str(tmp_path / "merge.yml") in message


def test_bad_indentation_gives_line(tmp_path):
    message = load_error(tmp_path, "base_model: base\n  gate_mode: random\n")
    assert "line 2, column 12" in message


def test_tab_indentation_gives_line(tmp_path):
    message = load_error(tmp_path, "base_model: base\nexperts:\n\t- source_model: a\n")
    assert "line 3, column 1" in message


def test_non_utf8_rejected(tmp_path):
    path = tmp_path / "merge.yml"
    path.write_bytes(TWO_RANDOM_EXPERTS.encode().replace(b"expert_a", b"expert_\xe9"))
    with pytest.raises(ConfigError) as caught:
        load_merge_config(path)
    message = str(caught.value)
    assert "not valid UTF-8" in message
    assert "0xe9" in message
    assert str(path) in message


def test_utf16_rejected(tmp_path):
    path = tmp_path / "merge.yml"
    path.write_bytes(TWO_RANDOM_EXPERTS.encode("utf-16"))
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_merge_config(path)


def test_empty_file_rejected(tmp_path):
    message = load_error(tmp_path, "")
    assert "empty" in message


def test_comment_only_file_rejected(tmp_path):
    message = load_error(tmp_path, "# nothing yet\n\n")
    assert "empty" in message


def test_top_level_list_rejected(tmp_path):
    message = load_error(tmp_path, "- base_model: base\n")
    assert "must be a mapping" in message


def test_missing_file_rejected(tmp_path):
    with pytest.raises(ConfigError, match="Cannot read merge config"):
        load_merge_config(tmp_path / "absent.yml")


def test_folder_as_file_rejected(tmp_path):
    with pytest.raises(ConfigError, match="Cannot read merge config"):
        load_merge_config(tmp_path)


# Required keys and types.


def test_missing_base_model(tmp_path):
    message = load_error(tmp_path, TWO_RANDOM_EXPERTS.replace("base_model: base\n", ""))
    assert "missing required key 'base_model'" in message


def test_missing_experts(tmp_path):
    message = load_error(tmp_path, "base_model: base\ngate_mode: random\n")
    assert "missing required key 'experts'" in message


def test_empty_experts_list(tmp_path):
    message = load_error(tmp_path, "base_model: base\ngate_mode: random\nexperts: []\n")
    assert "at least one expert" in message


def test_expert_missing_source_model(tmp_path):
    message = load_error(tmp_path, TWO_RANDOM_EXPERTS.replace("- source_model: expert_b", "- noise_scale: 0.1"))
    assert "experts[1] is missing required key 'source_model'" in message
    assert "line 5" in message


def test_experts_not_a_list(tmp_path):
    message = load_error(tmp_path, "base_model: base\ngate_mode: random\nexperts:\n  source_model: expert_a\n")
    assert "experts must be a list" in message
    assert "line 4" in message


def test_expert_not_a_mapping(tmp_path):
    message = load_error(tmp_path, "base_model: base\ngate_mode: random\nexperts:\n  - expert_a\n  - expert_b\n")
    assert "experts[0] must be a mapping" in message


def test_base_model_not_a_string(tmp_path):
    message = load_error(tmp_path, TWO_RANDOM_EXPERTS.replace("base_model: base", "base_model: 7"))
    assert "base_model must be a non-empty string" in message


def test_experts_per_token_string_rejected(tmp_path):
    message = load_error(tmp_path, TWO_RANDOM_EXPERTS + 'experts_per_token: "2"\n')
    assert "experts_per_token must be an integer" in message
    assert "line 6, column 20" in message


def test_experts_per_token_word_rejected(tmp_path):
    message = load_error(tmp_path, TWO_RANDOM_EXPERTS + "experts_per_token: two\n")
    assert "experts_per_token must be an integer" in message


def test_experts_per_token_float_rejected(tmp_path):
    message = load_error(tmp_path, TWO_RANDOM_EXPERTS + "experts_per_token: 1.5\n")
    assert "experts_per_token must be an integer" in message


def test_experts_per_token_zero_rejected(tmp_path):
    message = load_error(tmp_path, TWO_RANDOM_EXPERTS + "experts_per_token: 0\n")
    assert "at least 1" in message


def test_experts_per_token_above_expert_count(tmp_path):
    message = load_error(tmp_path, TWO_RANDOM_EXPERTS + "experts_per_token: 3\n")
    assert "experts_per_token is 3 but only 2 experts are listed" in message
    assert "line 6" in message


def test_experts_per_token_equal_to_expert_count(tmp_path):
    config = load_merge_config(write(tmp_path, TWO_RANDOM_EXPERTS + "experts_per_token: 2\n"))
    assert config.experts_per_token == 2


def test_prompts_not_a_list(tmp_path):
    text = cheap_embed_yaml('      - "algebra"').replace(
        '    positive_prompts:\n      - "algebra"', "    positive_prompts: algebra"
    )
    message = load_error(tmp_path, text)
    assert "experts[0].positive_prompts must be a list of strings" in message
    assert "line 5" in message


def test_null_prompt_rejected(tmp_path):
    message = load_error(tmp_path, cheap_embed_yaml("      - ~"))
    assert "entries must be strings" in message
    assert "line 6, column 9" in message


def test_nested_list_prompt_rejected(tmp_path):
    message = load_error(tmp_path, cheap_embed_yaml("      - [a, b]"))
    assert "entries must be strings" in message


def test_noise_scale_string_rejected(tmp_path):
    message = load_error(tmp_path, TWO_RANDOM_EXPERTS + '    noise_scale: "0.1"\n')
    assert "experts[1].noise_scale must be a number" in message
    assert "line 6" in message


def test_noise_scale_nan_rejected(tmp_path):
    message = load_error(tmp_path, TWO_RANDOM_EXPERTS + "    noise_scale: .nan\n")
    assert "finite" in message


def test_residual_scale_infinite_rejected(tmp_path):
    message = load_error(tmp_path, TWO_RANDOM_EXPERTS + "    residual_scale: -.inf\n")
    assert "finite" in message


# Gate modes.


def test_unknown_gate_mode_suggests_closest(tmp_path):
    message = load_error(tmp_path, TWO_RANDOM_EXPERTS.replace("gate_mode: random", "gate_mode: cheap_embeds"))
    assert "unknown gate_mode 'cheap_embeds'" in message
    assert "Known modes: hidden" in message
    assert message.endswith("Did you mean 'cheap_embed'?")
    assert "line 2, column 12" in message


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg", "hidden_last"])
def test_hidden_gate_modes_accepted(tmp_path, mode):
    text = cheap_embed_yaml('      - "algebra"').replace("gate_mode: cheap_embed", f"gate_mode: {mode}")
    config = load_merge_config(write(tmp_path, text))
    assert config.gate_mode == mode


def test_absent_gate_mode_means_hidden(tmp_path):
    text = cheap_embed_yaml('      - "algebra"').replace("gate_mode: cheap_embed\n", "")
    config = load_merge_config(write(tmp_path, text))
    assert config.gate_mode == "hidden"


def test_absent_gate_mode_needs_prompts(tmp_path):
    message = load_error(tmp_path, TWO_RANDOM_EXPERTS.replace("gate_mode: random\n", ""))
    assert "experts[0] has no positive_prompts" in message
    assert "gate_mode 'hidden'" in message
    assert "line 3, column 5" in message


def test_uniform_random_needs_no_prompts(tmp_path):
    config = load_merge_config(write(tmp_path, TWO_RANDOM_EXPERTS.replace("random", "uniform_random")))
    assert config.gate_mode == "uniform_random"


def test_cheap_embed_needs_prompts(tmp_path):
    text = TWO_RANDOM_EXPERTS.replace("gate_mode: random", "gate_mode: cheap_embed")
    message = load_error(tmp_path, text)
    assert "experts[0] has no positive_prompts" in message
    assert "line 4" in message


def test_identical_prompts_rejected(tmp_path):
    message = load_error(tmp_path, cheap_embed_yaml('      - "integrals"'))
    assert "same positive_prompts and negative_prompts" in message
    assert "line 4" in message


def test_identical_prompts_allowed_with_random(tmp_path):
    text = cheap_embed_yaml('      - "integrals"').replace("gate_mode: cheap_embed", "gate_mode: random")
    config = load_merge_config(write(tmp_path, text))
    assert config.experts[0].positive_prompts == config.experts[1].positive_prompts


def test_different_negative_prompts_suffice(tmp_path):
    text = cheap_embed_yaml('      - "integrals"') + "    negative_prompts:\n      - poetry\n"
    config = load_merge_config(write(tmp_path, text))
    assert config.experts[1].negative_prompts == ("poetry",)


def test_single_expert_allowed(tmp_path):
    text = "base_model: base\ngate_mode: cheap_embed\nexperts_per_token: 1\nexperts:\n  - source_model: a\n    positive_prompts: [x]\n"
    config = load_merge_config(write(tmp_path, text))
    assert len(config.experts) == 1


# dtype.


@pytest.mark.parametrize(
    "name, code",
    [("bfloat16", "BF16"), ("bf16", "BF16"), ("float16", "F16"), ("fp16", "F16"), ("float32", "F32"), ("torch.float32", "F32")],
)
def test_dtype_names(tmp_path, name, code):
    config = load_merge_config(write(tmp_path, TWO_RANDOM_EXPERTS + f"dtype: {name}\n"))
    assert config.dtype == code


def test_dtype_null_keeps_base(tmp_path):
    config = load_merge_config(write(tmp_path, TWO_RANDOM_EXPERTS + "dtype: null\n"))
    assert config.dtype is None


def test_invalid_dtype_rejected(tmp_path):
    message = load_error(tmp_path, TWO_RANDOM_EXPERTS + "dtype: int8\n")
    assert "'int8'" in message
    assert "bfloat16" in message
    assert "line 6, column 8" in message


def test_numeric_dtype_rejected(tmp_path):
    message = load_error(tmp_path, TWO_RANDOM_EXPERTS + "dtype: 16\n")
    assert "dtype must be a non-empty string" in message


# Prompt slips: accepted with a warning.


def test_unbalanced_quote_warns(tmp_path, config_warnings):
    config = load_merge_config(write(tmp_path, cheap_embed_yaml('      - science"')))
    messages = warning_messages(config_warnings)
    assert config.experts[0].positive_prompts == ('science"',)
    assert len(messages) == 1
    assert "unbalanced double quote" in messages[0]
    assert "line 6, column 9" in messages[0]


def test_wrapped_prompt_warns(tmp_path, config_warnings):
    load_merge_config(write(tmp_path, cheap_embed_yaml("      - '\"science\"'")))
    messages = warning_messages(config_warnings)
    assert len(messages) == 1
    assert "wrapped in quote characters" in messages[0]


def test_unclosed_single_quote_warns(tmp_path, config_warnings):
    load_merge_config(write(tmp_path, cheap_embed_yaml("      - \"'science\"")))
    messages = warning_messages(config_warnings)
    assert len(messages) == 1
    assert "single quote that is never closed" in messages[0]


def test_joined_prompts_warn(tmp_path, config_warnings):
    load_merge_config(write(tmp_path, cheap_embed_yaml("      - 'math\", \"science'")))
    messages = warning_messages(config_warnings)
    assert len(messages) == 1
    assert "several prompts" in messages[0]


def test_whitespace_prompt_warns(tmp_path, config_warnings):
    load_merge_config(write(tmp_path, cheap_embed_yaml('      - "   "')))
    messages = warning_messages(config_warnings)
    assert len(messages) == 1
    assert "only whitespace" in messages[0]


@pytest.mark.parametrize("scalar", ["yes", "42", "3.5", "off"])
def test_non_string_prompt_warns_and_keeps_text(tmp_path, config_warnings, scalar):
    config = load_merge_config(write(tmp_path, cheap_embed_yaml(f"      - {scalar}")))
    messages = warning_messages(config_warnings)
    assert config.experts[0].positive_prompts == (scalar,)
    assert len(messages) == 1
    assert "not a string in YAML" in messages[0]
    assert "line 6" in messages[0]


@pytest.mark.parametrize("prompt", ['"what\'s 2+2?"', "don't", "'it''s fine'", '"say \\"hi\\" please"', "plain words"])
def test_normal_prompt_no_warning(tmp_path, config_warnings, prompt):
    load_merge_config(write(tmp_path, cheap_embed_yaml(f"      - {prompt}")))
    assert warning_messages(config_warnings) == []
