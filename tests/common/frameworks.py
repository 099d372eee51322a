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
    stays bad, which makes a persistent loss incident; `corrupt_until` ends it there (a corrupt
    stretch of `corrupt_until - corrupt_after` items). `garbage` picks the corrupt bytes' range
    (e.g. (128, 256): binary data, bytes the text never holds). `fetched_indices` lists every
    index read, in order.
    """

    def __init__(self, seq_len: int = 32, items: int = 4096, corrupt_after: int | None = None,
                 corrupt_until: int | None = None, garbage: tuple[int, int] = (0, 256)) -> None:  # fmt: skip
        from pydoc_data.topics import topics

        text = "".join(topics[k] for k in sorted(topics)).encode("utf-8")[: seq_len * items]
        self.ids = torch.tensor(list(text), dtype=torch.long)
        self.seq_len, self.items = seq_len, len(self.ids) // seq_len
        self.corrupt_after, self.corrupt_until, self.fetched = corrupt_after, corrupt_until, 0
        self.garbage, self.fetched_indices = garbage, []

    def __len__(self) -> int:
        return self.items

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.fetched += 1
        self.fetched_indices.append(i)
        x = self.ids[i * self.seq_len : (i + 1) * self.seq_len]
        if self.corrupt_after is not None and self.corrupt_after < self.fetched <= (self.corrupt_until or self.fetched):
            x = torch.randint(*self.garbage, (self.seq_len,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x.clone()}
