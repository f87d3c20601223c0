"""One step's sampled sequences and their packing into fixed-shape micro-batches.

A `RolloutBatch` holds the B*G policy samples of a step in group-major order:
prompt tokens, completion tokens (cut after the first EOS), one advantage per
sample, and optionally per-token log-probs from the rollout engine (for the
clipped-ratio loss and the mismatch metric) and from the reference model (KL).

`make_micro_batches` turns a slice of it into micro-batches of identical shape
[b, S] (Megatron's pipeline schedule sends fixed-shape activations between
stages), right-padded, with targets shifted by one and a loss mask that is 1
exactly on the positions whose target is a completion token.

`make_packed_micro_batches` does the same with several samples per row (first-fit
decreasing into rows of a fixed length) and `segment_ids` that restrict attention
to each sample's own tokens, so padding costs no compute. Rows are spread evenly
over the micro-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class RolloutBatch:
    """B*G samples of one RL step, group-major (sample i belongs to prompt i // G)."""

    prompt_ids: list[list[int]]
    """Prompt tokens per sample."""
    completion_ids: list[list[int]]
    """Completion tokens per sample, up to and including the first EOS."""
    advantages: torch.Tensor
    """[B*G] float32 advantage per sample (SFT: all ones)."""
    rollout_logprobs: Optional[list[list[float]]] = None
    """Per completion token, log-prob under the rollout engine at sampling time."""
    ref_logprobs: Optional[list[list[float]]] = None
    """Per completion token, log-prob under the reference model (KL penalty)."""

    def __post_init__(self) -> None:
        n = len(self.prompt_ids)
        if len(self.completion_ids) != n or self.advantages.shape != (n,):
            raise ValueError(
                f"RolloutBatch: {n} prompts, {len(self.completion_ids)} completions, advantages {tuple(self.advantages.shape)}"
            )
        for name in ("rollout_logprobs", "ref_logprobs"):
            lps = getattr(self, name)
            if lps is not None:
                bad = [i for i, (lp, c) in enumerate(zip(lps, self.completion_ids)) if len(lp) != len(c)]
                if len(lps) != n or bad:
                    raise ValueError(f"RolloutBatch.{name}: lengths differ from completions at samples {bad[:5]}")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def num_completion_tokens(self, indices: Optional[range] = None) -> int:
        """Total completion tokens (the loss denominator) over `indices` (all by default)."""
        idx = range(len(self)) if indices is None else indices
        return sum(len(self.completion_ids[i]) for i in idx)

    def max_seq_len(self) -> int:
        """Longest prompt + completion, tokens."""
        return max(len(p) + len(c) for p, c in zip(self.prompt_ids, self.completion_ids))


@dataclass
class MicroBatch:
    """Fixed-shape model inputs and loss targets; padded rows and positions have loss_mask 0."""

    tokens: torch.Tensor
    """[b, S] int64 input ids (0 where padded)."""
    position_ids: torch.Tensor
    """[b, S] int64."""
    targets: torch.Tensor
    """[b, S] int64: tokens shifted left by one (the token predicted at each position)."""
    loss_mask: torch.Tensor
    """[b, S] float32: 1 where the target is a completion token."""
    advantages: torch.Tensor
    """[b, S] float32: the sample's advantage on each position."""
    rollout_logprobs: Optional[torch.Tensor]
    """[b, S] float32 log-prob of the target under the rollout engine (0 where masked), or None."""
    ref_logprobs: Optional[torch.Tensor]
    """[b, S] float32 log-prob of the target under the reference model, or None."""
    sample_index: torch.Tensor
    """Index into the RolloutBatch, -1 for padding: [b] (one sample per row) or [b, S] per position (packed)."""
    segment_ids: Optional[torch.Tensor] = None
    """[b, S] int64 for packed rows: positions attend only to earlier positions of the same segment (one
    segment per sample; a row's tail padding is one more). None: one sample per row, plain causal attention."""

    @property
    def num_tokens(self) -> int:
        """Completion tokens in this micro-batch."""
        return int(self.loss_mask.sum().item())


def micro_batch_shape(batch: RolloutBatch, token_budget: int, multiple_of: int = 8) -> tuple[int, int]:
    """(rows b, length S) of every micro-batch: S = longest sequence rounded up, b = token_budget // S (>= 1)."""
    seq = batch.max_seq_len()
    seq = ((seq + multiple_of - 1) // multiple_of) * multiple_of
    return max(1, token_budget // seq), seq


def make_micro_batches(batch: RolloutBatch, indices: range, rows: int, seq_len: int) -> list[MicroBatch]:
    """Pack samples `indices` of `batch` into ceil(len/rows) micro-batches of shape [rows, seq_len]."""
    out = []
    idx = list(indices)
    for start in range(0, len(idx), rows):
        chunk = idx[start : start + rows]
        tokens = torch.zeros(rows, seq_len, dtype=torch.long)
        targets = torch.zeros(rows, seq_len, dtype=torch.long)
        loss_mask = torch.zeros(rows, seq_len, dtype=torch.float32)
        adv = torch.zeros(rows, seq_len, dtype=torch.float32)
        old_lp = torch.zeros(rows, seq_len) if batch.rollout_logprobs is not None else None
        ref_lp = torch.zeros(rows, seq_len) if batch.ref_logprobs is not None else None
        sample_index = torch.full((rows,), -1, dtype=torch.long)
        for row, i in enumerate(chunk):
            p, c = batch.prompt_ids[i], batch.completion_ids[i]
            n_p, n_c = len(p), len(c)
            if n_p + n_c > seq_len:
                raise ValueError(f"sample {i}: {n_p + n_c} tokens exceed the micro-batch length {seq_len}")
            if n_p == 0:
                raise ValueError(f"sample {i}: empty prompt (at least one token is needed to predict the first completion token)")
            seq = torch.tensor(p + c, dtype=torch.long)
            tokens[row, : n_p + n_c] = seq
            targets[row, : n_p + n_c - 1] = seq[1:]
            # Position t predicts token t+1; completion token j sits at n_p + j, predicted from n_p + j - 1.
            span = slice(n_p - 1, n_p - 1 + n_c)
            loss_mask[row, span] = 1.0
            adv[row, span] = float(batch.advantages[i])
            if old_lp is not None:
                old_lp[row, span] = torch.tensor(batch.rollout_logprobs[i], dtype=torch.float32)
            if ref_lp is not None:
                ref_lp[row, span] = torch.tensor(batch.ref_logprobs[i], dtype=torch.float32)
            sample_index[row] = i
        position_ids = torch.arange(seq_len, dtype=torch.long).unsqueeze(0).expand(rows, -1).contiguous()
        out.append(MicroBatch(tokens, position_ids, targets, loss_mask, adv, old_lp, ref_lp, sample_index))
    return out


def pack_rows(lengths: list[int], row_len: int) -> list[list[int]]:
    """First-fit decreasing: indices into `lengths` (tokens) grouped into rows of at most `row_len` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        if lengths[i] > row_len:
            raise ValueError(f"a sample of {lengths[i]} tokens exceeds the packed row length {row_len}")
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_len - lengths[i])
    return rows


def packed_row_length(batch: RolloutBatch, token_budget: int, factor: int = 2, multiple_of: int = 8) -> int:
    """Packed row length (tokens): `factor` x the longest sequence rounded up to `multiple_of`, at most the budget
    (but never below the longest sequence)."""
    longest = ((batch.max_seq_len() + multiple_of - 1) // multiple_of) * multiple_of
    return max(longest, min(factor * longest, (token_budget // multiple_of) * multiple_of))


def _packed_layout(lengths: list[int], token_budget: int, row_len: int) -> tuple[list[list[int]], int, int]:
    """(rows of positions into `lengths`, micro-batch count, rows per micro-batch) for packed rows of `row_len`."""
    rows = pack_rows(lengths, row_len)
    max_rows = max(1, token_budget // row_len)
    num_micro = math.ceil(len(rows) / max_rows)
    return rows, num_micro, math.ceil(len(rows) / num_micro)


def choose_row_length(batch: RolloutBatch, indices: range, token_budget: int, max_factor: int = 2,
                      multiple_of: int = 8) -> int:
    """Packed row length for samples `indices`: of 1..max_factor x the longest sequence (`packed_row_length`), the
    one computing the fewest tokens; within 2% of that, the shortest (attention cost grows with the row)."""
    lengths = [len(batch.prompt_ids[i]) + len(batch.completion_ids[i]) for i in indices]
    options = sorted({packed_row_length(batch, token_budget, f, multiple_of) for f in range(1, max_factor + 1)})
    if not lengths:
        return options[0]
    computed = {}
    for row_len in options:
        _, num_micro, per_micro = _packed_layout(lengths, token_budget, row_len)
        computed[row_len] = num_micro * per_micro * row_len
    fewest = min(computed.values())
    return next(r for r in options if computed[r] <= 1.02 * fewest)


def make_packed_micro_batches(batch: RolloutBatch, indices: range, token_budget: int,
                              row_len: int) -> list[MicroBatch]:
    """Pack samples `indices` into rows of `row_len` tokens, then into the fewest micro-batches of at most
    `token_budget` tokens, all of the same shape [b, row_len] with b as even as possible."""
    idx = list(indices)
    if not idx:
        return []
    for i in idx:
        if not batch.prompt_ids[i]:
            raise ValueError(f"sample {i}: empty prompt (at least one token is needed to predict the first completion token)")
    lengths = [len(batch.prompt_ids[i]) + len(batch.completion_ids[i]) for i in idx]
    positions, num_micro, per_micro = _packed_layout(lengths, token_budget, row_len)
    rows = [[idx[j] for j in row] for row in positions]
    return [_packed_micro_batch(batch, rows[start : start + per_micro], per_micro, row_len)
            for start in range(0, num_micro * per_micro, per_micro)]


def _packed_micro_batch(batch: RolloutBatch, rows: list[list[int]], num_rows: int, row_len: int) -> MicroBatch:
    """One [num_rows, row_len] micro-batch from rows of sample indices (missing rows are padding).

    Built as flat Python lists and converted once per field (a per-sample tensor op costs more than the copy).
    """
    advantages = batch.advantages.tolist()
    fields = ("tokens", "targets", "position_ids", "segment_ids", "sample_index", "loss_mask", "advantages",
              "rollout_logprobs", "ref_logprobs")
    cols: dict[str, list] = {f: [] for f in fields}  # flat, row after row
    for r in range(num_rows):
        row = {f: [] for f in fields}
        samples = rows[r] if r < len(rows) else []
        for seg, i in enumerate(samples):
            p, c = batch.prompt_ids[i], batch.completion_ids[i]
            n_p, n_c = len(p), len(c)
            n = n_p + n_c
            # Position t predicts token t+1; completion token j sits at n_p + j, predicted from n_p + j - 1;
            # the sample's last position predicts nothing (never the next sample's first token).
            row["tokens"] += p + c
            row["targets"] += p[1:] + c + [0]
            row["position_ids"] += range(n)
            row["segment_ids"] += [seg] * n
            row["sample_index"] += [i] * n
            row["loss_mask"] += [0.0] * (n_p - 1) + [1.0] * n_c + [0.0]
            row["advantages"] += [0.0] * (n_p - 1) + [advantages[i]] * n_c + [0.0]
            for name in ("rollout_logprobs", "ref_logprobs"):
                lps = getattr(batch, name)
                if lps is not None:
                    row[name] += [0.0] * (n_p - 1) + list(lps[i]) + [0.0]
        tail = row_len - len(row["tokens"])
        pad = {"position_ids": list(range(tail)), "segment_ids": [len(samples)] * tail,  # tail: its own segment
               "sample_index": [-1] * tail}
        for f in fields:
            cols[f] += row[f] + pad.get(f, [0] * tail)

    def as_tensor(f: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(cols[f], dtype=dtype).view(num_rows, row_len)

    long = {f: as_tensor(f, torch.long) for f in fields[:5]}
    flt = {f: as_tensor(f, torch.float32) for f in fields[5:7]}
    lps = {f: as_tensor(f, torch.float32) if getattr(batch, f) is not None else None for f in fields[7:]}
    return MicroBatch(long["tokens"], long["position_ids"], long["targets"], flt["loss_mask"], flt["advantages"],
                      lps["rollout_logprobs"], lps["ref_logprobs"], long["sample_index"], long["segment_ids"])


def shard_indices(num_samples: int, rank: int, world: int) -> range:
    """Contiguous slice of [0, num_samples) owned by data-parallel `rank` of `world` (sizes differ by <= 1)."""
    base, extra = divmod(num_samples, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
