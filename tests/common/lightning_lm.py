"""A tiny character language model as a LightningModule, and a Lightning fit on CPU, for the Lightning tests."""

from __future__ import annotations

import lightning.pytorch as L
import torch

from tests.common.models import lm_loss, make_model

__all__ = ["CharLM", "fit"]


class CharLM(L.LightningModule):
    """The tiny test transformer as a LightningModule; keeps every training_step loss it returned."""

    def __init__(self, lr: float = 1e-3, decay_steps: int = 0) -> None:
        super().__init__()
        self.net = make_model(logits_only=True, vocab_size=256)
        self.lr, self.decay_steps, self.losses = lr, decay_steps, []

    def training_step(self, batch, batch_idx):
        loss = lm_loss(self.net(batch["input_ids"][:, :-1]), batch["labels"][:, 1:])
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        if not self.decay_steps:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / self.decay_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fit(tmp_path, module, data, callbacks, *, batch_size: int = 4, **trainer_args) -> L.Trainer:
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(tmp_path))  # fmt: skip
    trainer = L.Trainer(callbacks=callbacks, **{**settings, **trainer_args})
    trainer.fit(module, loader)
    return trainer
