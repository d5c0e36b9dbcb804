"""gradwatch in a Hugging Face Trainer: one callback, on a tiny BERT built from a config.

One batch is corrupt (its loss is NaN). The Trainer's logged loss hides it
(``logging_nan_inf_filter``); gradwatch counts it, reports it and skips that step.

Run: python examples/hf_trainer.py   (CPU, a few seconds, nothing downloaded)
"""

from __future__ import annotations

import tempfile

import torch
import transformers
from gradwatch.integrations.transformers import GradWatch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, seq: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(3, 100, (n, seq), generator=g)
        self.y = (self.x[:, :4] < 50).sum(1).ge(2).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]), "labels": self.y[i]}


class BertWithACorruptBatch(BertForSequenceClassification):
    """Its loss is NaN on the 13th training batch, as a batch with a broken label would make it."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        if self.training:
            self.batches = getattr(self, "batches", 0) + 1
            if self.batches == 13:
                out.loss = out.loss * float("nan")
        return out


def main() -> None:
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = BertWithACorruptBatch(config)
    gradwatch_callback = GradWatch()  # policy="auto"
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=40, per_device_train_batch_size=16, learning_rate=5e-4,
                                 report_to=[], use_cpu=True, logging_steps=10, save_strategy="no",
                                 disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[gradwatch_callback])
        trainer.train()
    logged = [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]
    print("the Trainer's logged losses:", logged)
    print(f"gradwatch: {gradwatch_callback.nonfinite_losses} NaN/Inf loss(es) in "
          f"{gradwatch_callback.micro_batches} batches")
    print(gradwatch_callback.report().summary())


if __name__ == "__main__":
    main()
