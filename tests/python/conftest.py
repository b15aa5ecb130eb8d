from __future__ import annotations

import pytest
import torch

import pagedkv  # noqa: F401
from pagedkv import data


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = data.stories260k()
    if not path.exists():
        pytest.skip(f"stories260K not found at {path} (set PAGEDKV_DATA_DIR)")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


@pytest.fixture(scope="session")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        path = data.smollm2()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok
