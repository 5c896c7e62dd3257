"""Small helpers upstream exports from the package root: a timing context and a growable sequence tensor."""

from __future__ import annotations

import time

import torch


class Timer:
    """`with Timer() as t: ...` then `t.interval` is the elapsed time in seconds (monotonic clock)."""

    start_time: float
    end_time: float
    interval: float

    def __enter__(self) -> "Timer":
        self.start_time = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        self.end_time = time.perf_counter()
        self.interval = self.end_time - self.start_time


class SeqTensor:
    """A tensor that grows along one dimension (`seq_dim`) without reallocating on every append.

    Storage (`tensor`) is allocated in whole pages of PAGE_SIZE positions along `seq_dim`; the first
    `seq_len` positions hold data and `torch()` is a view of exactly those.
    """

    PAGE_SIZE = 256

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        seq_dim: int,
        device: torch.device | str = "cpu",
        init_cap: int = -1,
    ) -> None:
        self.seq_dim = seq_dim % len(shape)
        self.seq_len = 0
        self.seq_cap = self._pages_for(max(init_cap, 1))
        shape = list(shape)
        shape[self.seq_dim] = self.seq_cap
        self.tensor = torch.empty(shape, dtype=dtype, device=device)

    @classmethod
    def _pages_for(cls, length: int) -> int:
        return -(-length // cls.PAGE_SIZE) * cls.PAGE_SIZE

    @staticmethod
    def from_tensor(tensor: torch.Tensor, seq_dim: int) -> "SeqTensor":
        s = SeqTensor(tuple(tensor.shape), tensor.dtype, seq_dim, tensor.device, init_cap=tensor.shape[seq_dim])
        s.append(tensor)
        return s

    def __len__(self) -> int:
        return self.seq_len

    def __bool__(self) -> bool:
        return self.seq_len > 0

    def clone(self, drop: int | None = None) -> "SeqTensor":
        """A copy; with `drop`, without the last `drop` positions."""
        keep = self.seq_len - drop if drop and drop <= self.seq_len else self.seq_len
        return SeqTensor.from_tensor(self.torch_slice(None, keep), self.seq_dim)

    def clear(self) -> None:
        self.seq_len = 0

    def set(self, new_data: "SeqTensor | torch.Tensor | None" = None) -> None:
        self.clear()
        self.append(new_data)

    def append(self, new_data: "SeqTensor | torch.Tensor | None") -> None:
        if new_data is None:
            return
        if isinstance(new_data, SeqTensor):
            new_data = new_data.torch()
        end = self.seq_len + new_data.shape[self.seq_dim]
        if end > self.seq_cap:
            grow = list(self.tensor.shape)
            grow[self.seq_dim] = self._pages_for(end) - self.seq_cap
            extra = torch.empty(grow, dtype=self.tensor.dtype, device=self.tensor.device)
            self.tensor = torch.cat((self.tensor, extra), dim=self.seq_dim)
            self.seq_cap = self.tensor.shape[self.seq_dim]
        self.tensor.narrow(self.seq_dim, self.seq_len, end - self.seq_len).copy_(new_data)
        self.seq_len = end

    def truncate(self, new_len: int) -> None:
        if not 0 <= new_len <= self.seq_len:
            raise ValueError(f"cannot truncate a SeqTensor of length {self.seq_len} to {new_len}")
        self.seq_len = new_len

    def torch(self) -> torch.Tensor:
        return self.tensor.narrow(self.seq_dim, 0, self.seq_len)

    def slice(self, a: int | None, b: int | None) -> "SeqTensor":
        return SeqTensor.from_tensor(self.torch_slice(a, b), self.seq_dim)

    def torch_slice(self, a: int | None, b: int | None) -> torch.Tensor:
        """View of positions [a, b) of the data; None means the start or the end."""
        start = 0 if a is None else a
        end = self.seq_len if b is None else b
        return self.tensor.narrow(self.seq_dim, start, end - start)
