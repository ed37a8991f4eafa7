"""From an episode's generations to training samples with a loss mask (pure functions).

Every policy step is recorded as token ids: ``prompt_ids`` are exactly the tokens the model was
fed (the chat template applied to ``visible_messages(system, task, turns[:t], window)``, the
agent loop's own view) and ``completion_ids`` exactly the tokens it generated. So a step's
sample is, by construction, the context the agent loop showed at that step; with a window the
earlier turns beyond it are simply not in the prompt (history-aware training, AWM §4.2).

Consecutive steps share one sample when the later prompt begins with the earlier prompt plus
its completion token for token (always the case with ``window=None`` when the template re-renders
the history identically, and for the first ``w`` steps with a window). The tokens between two
completions (tool results, template markup) are then in the sequence but masked out of the loss.
Under the token-level loss the trainer uses (``loss_type="dapo"``), a merged sample contributes
exactly the per-token terms of its steps, so merging only saves compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepRecord:
    """One policy generation: what the model was fed and what it wrote, as token ids."""

    prompt_ids: list[int]
    completion_ids: list[int]
    overflow: bool = False
    """The context was longer than the prompt limit, so nothing was generated."""


@dataclass
class Sample:
    """One training sequence: ``prompt_ids + completion_ids``, loss only where ``mask`` is 1.

    ``spans[k] = (start, end)`` locates step ``steps[k]``'s generated tokens inside
    ``completion_ids``; everything before ``start`` in the whole sequence is that step's context.
    """

    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)

    @property
    def policy_tokens(self) -> int:
        return sum(self.mask)

    def context_of(self, k: int) -> list[int]:
        """The exact token context of the sample's ``k``-th step."""
        return self.prompt_ids + self.completion_ids[: self.spans[k][0]]


def build_samples(steps: list[StepRecord], *, merge: bool = True) -> list[Sample]:
    """Samples for one episode's steps (in order). Steps that generated nothing are skipped."""
    samples: list[Sample] = []
    cur: Sample | None = None
    for t, step in enumerate(steps):
        if not step.completion_ids:
            continue
        if merge and cur is not None:
            seq = cur.prompt_ids + cur.completion_ids
            if len(step.prompt_ids) >= len(seq) and step.prompt_ids[: len(seq)] == seq:
                gap = step.prompt_ids[len(seq):]
                cur.completion_ids += gap
                cur.mask += [0] * len(gap)
                start = len(cur.completion_ids)
                cur.completion_ids += step.completion_ids
                cur.mask += [1] * len(step.completion_ids)
                cur.steps.append(t)
                cur.spans.append((start, len(cur.completion_ids)))
                continue
        cur = Sample(prompt_ids=list(step.prompt_ids), completion_ids=list(step.completion_ids),
                     mask=[1] * len(step.completion_ids), steps=[t], spans=[(0, len(step.completion_ids))])
        samples.append(cur)
    return samples


def microbatch_cost(lengths: list[tuple[int, int]]) -> int:
    """Tokens one forward pass over these (prompt, completion) rows costs: prompts are padded on
    the left to the longest prompt and completions on the right to the longest completion."""
    if not lengths:
        return 0
    return len(lengths) * (max(p for p, _ in lengths) + max(c for _, c in lengths))


def pack_microbatches(lengths: list[tuple[int, int]], budget: int) -> list[list[int]]:
    """Row indices grouped so that no group's padded cost exceeds ``budget`` tokens.

    Rows are taken longest first and each goes to the first group it fits (first-fit decreasing),
    so similar lengths share a pass and little is padding. A row longer than the budget on its
    own is an error: the config guarantees the budget holds the longest possible sample.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-(lengths[i][0] + lengths[i][1]), i))
    groups: list[list[int]] = []
    shapes: list[list[int]] = []  # per group: rows, longest prompt, longest completion
    for i in order:
        p, c = lengths[i]
        if p + c > budget:
            raise ValueError(f"a sample of {p + c} tokens does not fit the micro-batch budget of {budget} tokens")
        for g, shape in zip(groups, shapes):
            n, mp, mc = shape
            if (n + 1) * (max(mp, p) + max(mc, c)) <= budget:
                g.append(i)
                shape[:] = [n + 1, max(mp, p), max(mc, c)]
                break
        else:
            groups.append([i])
            shapes.append([1, p, c])
    return groups
