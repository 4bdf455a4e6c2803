"""Data types: safetensors codes, torch dtypes, YAML names and item sizes."""

import torch

from .errors import ConfigError

# Bytes per element of every dtype code that the safetensors format defines.
# The header parser needs all of them to check sizes, even for dtypes that
# the merge cannot convert.
ITEM_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

# Floating-point dtypes that the merge converts between.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}

# Names accepted for `dtype:` in the YAML and in config.json, as mergekit and
# transformers spell them.
_NAME_TO_CODE: dict[str, str] = {
    "float32": "F32",
    "fp32": "F32",
    "float": "F32",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
}

CODE_TO_NAME: dict[str, str] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def dtype_code_from_name(name: str) -> str:
    """Return the safetensors code for a dtype name such as ``bfloat16``.

    Raises:
        ConfigError: the name is not a supported floating-point dtype.
    """
    code = _NAME_TO_CODE.get(str(name).strip().lower().removeprefix("torch."))
    if code is None:
        known = ", ".join(sorted(set(CODE_TO_NAME.values())))
        raise ConfigError(f"Unsupported dtype {name!r}. Use one of: {known}.")
    return code


def torch_dtype(code: str) -> torch.dtype:
    """Return the torch dtype for a convertible safetensors code."""
    return TORCH_DTYPES[code]
