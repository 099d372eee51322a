"""A Lightning run recorded by spikedoc: one callback, the LightningModule and Trainer otherwise unchanged.

Trains a small character-level transformer on the UTF-8 bytes of Python's own documentation, with
gradient accumulation and Lightning's own gradient clipping.

    python hooks/lightning.py --run-dir runs/lightning --steps 100
    spikedoc analyze runs/lightning

With `--heal` the callback guards the run instead: a bad step is vetoed before its update and
damage is rolled back in process (`SpikedocCallback(heal=...)`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

# Run as a script, this file's folder comes first on sys.path and its name would hide the lightning
# package: look in the checkout root instead (which also makes spikedoc importable uninstalled).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import lightning.pytorch as L  # noqa: E402

from hooks.plain_torch import CharTransformer, batches  # noqa: E402
from spikedoc.guard import GuardConfig  # noqa: E402
from spikedoc.integrations.lightning import SpikedocCallback  # noqa: E402


class ByteStream(torch.utils.data.IterableDataset):
    """Endless random windows of Python's documentation as bytes: {"input_ids", "labels"} of `seq_len`."""

    def __init__(self, seq_len: int = 64) -> None:
        from pydoc_data.topics import topics

        data = "".join(topics[k] for k in sorted(topics)).encode("utf-8")
        self.ids, self.seq_len = torch.tensor(list(data), dtype=torch.long), seq_len

    def __iter__(self):
        for batch in batches(self.ids, 1, self.seq_len):
            yield {k: v[0] for k, v in batch.items()}


class CharLM(L.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.net, self.lr = CharTransformer(vocab=256), lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.net(batch["input_ids"])["logits"]  # (B, T, vocab)
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="where spikedoc writes the run")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps to train")
    parser.add_argument("--heal", action="store_true", help="veto bad steps and roll back damage in process")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # small model: one thread is fastest on a shared CPU
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(ByteStream(), batch_size=8)
    trainer = L.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, accumulate_grad_batches=2, gradient_clip_val=1.0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tempfile.mkdtemp(),
        callbacks=[SpikedocCallback(args.run_dir, heal=GuardConfig(checkpoint_every=50) if args.heal else False)],
    )  # fmt: skip
    trainer.fit(CharLM(), loader)
    print(f"recorded {trainer.global_step} steps to {args.run_dir}")


if __name__ == "__main__":
    main()
