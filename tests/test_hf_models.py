"""Hugging Face models built from a config (no download): GPT-2 with its ``Conv1D``, BERT with a padding mask, Llama.
Each is factorized under a budget, saved with ``save_pretrained``, and reloaded with ``load_factorized`` into a model
built from the saved config: logits equal, and ``generate`` equal for the causal models."""

from __future__ import annotations

import warnings

import pytest
import torch

import lightning_rank as lr

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config), transformers.AutoModelForCausalLM


def llama():
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(config), transformers.AutoModelForCausalLM


def bert():
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                     vocab_size=128, max_position_embeddings=32)
    return transformers.BertModel(config), transformers.AutoModel


def batches(seed: int, padded: bool) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        ids = torch.randint(1, 128, (4, 16), generator=g)
        mask = torch.ones_like(ids)
        if padded:
            mask[1:, 10:] = 0  # right padding in three of four sequences
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.mark.parametrize("build", [gpt2, bert, llama], ids=["gpt2", "bert", "llama"])
def test_factorized_save_pretrained_reloads_exactly(build, tmp_path) -> None:
    torch.manual_seed(0)
    model, auto = build()
    model.eval()
    data = batches(0, padded=build is bert)
    stats = lr.collect(model, data, mask_fn=lambda batch: batch["attention_mask"].bool())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = lr.factorize_(model, stats, param_budget=0.5, progress=False)
    assert result.layers and result.layer_params_after < result.layer_params_before
    report = lr.analyze(model, lr.collect(model, data), progress=False)
    kinds = {report.layers[name].kind for name in result.layers}
    assert kinds == ({"hf_conv1d"} if build is gpt2 else {"linear"})  # a factorized layer keeps its kind

    model.save_pretrained(tmp_path)
    fresh = auto.from_config(transformers.AutoConfig.from_pretrained(tmp_path)).eval()
    lr.load_factorized(fresh, safetensors_torch.load_file(tmp_path / "model.safetensors"))
    with torch.no_grad():
        for batch in data:
            ours, theirs = model(**batch), fresh(**batch)
            name = "logits" if hasattr(ours, "logits") else "last_hidden_state"
            assert torch.equal(getattr(ours, name), getattr(theirs, name))
    if auto is transformers.AutoModelForCausalLM:
        prompt = data[0]["input_ids"][:1, :5]
        generated = [m.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
                     for m in (model, fresh)]
        assert torch.equal(*generated) and generated[0].shape[1] == 11
