"""Shared pieces for the framework tests: real text as byte-level language-model samples."""

from __future__ import annotations

import pytest
import torch

__all__ = ["ByteText", "require"]


def require(module: str, extra: str):
    """Import `module`, or skip the test saying which extra installs it."""
    return pytest.importorskip(module, reason=f"{module} is not installed: pip install -e '.[{extra}]'")


class ByteText(torch.utils.data.Dataset):
    """Python's own documentation as UTF-8 bytes, cut into `{"input_ids", "labels"}` windows of `seq_len`.

    From the `corrupt_after`-th item fetched on, items are random bytes: a bad data shard that
    stays bad, which makes a persistent loss incident.
    """

    def __init__(self, seq_len: int = 32, items: int = 4096, corrupt_after: int | None = None) -> None:
        from pydoc_data.topics import topics

        text = "".join(topics[k] for k in sorted(topics)).encode("utf-8")[: seq_len * items]
        self.ids = torch.tensor(list(text), dtype=torch.long)
        self.seq_len, self.items = seq_len, len(self.ids) // seq_len
        self.corrupt_after, self.fetched = corrupt_after, 0

    def __len__(self) -> int:
        return self.items

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.fetched += 1
        x = self.ids[i * self.seq_len : (i + 1) * self.seq_len]
        if self.corrupt_after is not None and self.fetched > self.corrupt_after:
            x = torch.randint(256, (self.seq_len,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x.clone()}
