import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, os.cpu_count() or 1))

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little girl who",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "In 1492, Columbus",
    "The quick brown fox",
    "To make a cup of tea, first",
    "Shakespeare wrote many plays, including",
    "The largest planet in our solar system is",
    "List three fruits: apple,",
]


@pytest.fixture(scope="session")
def smollm2():
    from fineserve_core.model_source import resolve_model
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    from fineserve_core.model_source import load_tokenizer
    return load_tokenizer(smollm2)


@pytest.fixture(scope="session")
def prompts(tokenizer):
    """Ten-plus plain prompts and one chat-templated prompt, as token ids."""
    ids = [tokenizer.encode(p) for p in PROMPTS]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                         add_generation_prompt=True, tokenize=False)
    return ids + [tokenizer.encode(chat)]
