"""A Hugging Face `Trainer` run recorded by spikedoc: one callback, the Trainer otherwise unchanged.

Trains a tiny GPT-2 (built from a config, nothing downloaded) on the UTF-8 bytes of Python's own
documentation, with gradient accumulation, the Trainer's own clipping and a linear LR schedule.

    python hooks/hf_trainer.py --run-dir runs/hf --steps 100
    spikedoc analyze runs/hf

With `--heal` the callback guards the run instead: a bad step is vetoed before its update and
damage is rolled back in process (`SpikedocCallback(heal=...)`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from spikedoc.guard import GuardConfig  # noqa: E402
from spikedoc.integrations.hf import SpikedocCallback  # noqa: E402


class ByteWindows(torch.utils.data.Dataset):
    """Python's documentation as UTF-8 bytes, in windows of `seq_len`: {"input_ids", "labels"}."""

    def __init__(self, seq_len: int = 64) -> None:
        from pydoc_data.topics import topics

        data = "".join(topics[k] for k in sorted(topics)).encode("utf-8")
        self.ids = torch.tensor(list(data), dtype=torch.long)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.ids) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.ids[i * self.seq_len : (i + 1) * self.seq_len]
        return {"input_ids": x, "labels": x.clone()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="where spikedoc writes the run")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps to train")
    parser.add_argument("--output-dir", default=None, help="the Trainer's output dir (default: a temporary one)")
    parser.add_argument("--heal", action="store_true", help="veto bad steps and roll back damage in process")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # small model: one thread is fastest on a shared CPU
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4))
    training = TrainingArguments(
        output_dir=args.output_dir or tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, learning_rate=3e-3, warmup_steps=10, max_grad_norm=1.0,
        logging_steps=25, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    # The one call: a callback. It stops training on a persistent incident and logs how to resume;
    # with heal= it vetoes bad steps and rolls back in process instead.
    callback = SpikedocCallback(args.run_dir, heal=GuardConfig(checkpoint_every=50) if args.heal else False)
    trainer = Trainer(model=model, args=training, train_dataset=ByteWindows(), callbacks=[callback])
    trainer.train()
    print(f"recorded {trainer.state.global_step} steps to {args.run_dir}")


if __name__ == "__main__":
    main()
