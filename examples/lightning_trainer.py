"""gradwatch in a Lightning Trainer: one callback; norms go to the Trainer's logger.

Run: python examples/lightning_trainer.py   (CPU, a few seconds)
"""

from __future__ import annotations

import tempfile

import lightning.pytorch as pl
import torch
from gradwatch.integrations.lightning import GradWatch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Regressor(pl.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                                 nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    data = DataLoader(TensorDataset(x, x[:, :1] * 2 + x[:, 1:2] ** 2 - 1), batch_size=256)
    gradwatch_callback = GradWatch()  # policy="auto"
    with tempfile.TemporaryDirectory() as logs:
        trainer = pl.Trainer(
            max_steps=120, accelerator="cpu", callbacks=[gradwatch_callback],
            logger=CSVLogger(logs), log_every_n_steps=20, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False,
        )
        trainer.fit(Regressor(lr=0.3), data)  # LR too high: unwatched, this diverges to NaN
        logged = sorted(k for k in trainer.logged_metrics if k.startswith(("grad_norm/", "gradwatch/")))
    print(gradwatch_callback.report().summary())
    print("logged through the Trainer's logger:", ", ".join(logged))


if __name__ == "__main__":
    main()
