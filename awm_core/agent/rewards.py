"""From a finished episode to a label and a reward.

The task's verifier runs in the sandbox on (initial database, final database, final answer).
Without a judge its verdict decides: complete → completed, partial → partially_completed,
incomplete → agent_error. With a judge (the paper's code-augmented judge) the verifier's code and
evidence, the task's success/failure criteria and a summary of the trajectory go to an LLM that
classifies the episode. Labels map to rewards with ``settings.rewards``. An episode the
environment failed (a tool call with ``error_kind="environment"``, a verifier crash or timeout)
is ``environment_error`` with ``env_error=True``, so training can leave it out of the loss.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from awm_core.agent.episode import Episode
from awm_core.errors import AWMError
from awm_core.models import BENCHMARKS, Environment, Verifier
from awm_core.runtime.bfcl_env import call_string

LABELS = ("completed", "partially_completed", "agent_error", "environment_error", "format_error")
JUDGE_LABELS = ("completed", "partially_completed", "agent_error", "environment_error")
VERDICT_LABELS = {"complete": "completed", "partial": "partially_completed", "incomplete": "agent_error"}


@dataclass
class Outcome:
    """The verdict on one episode. ``env_error`` episodes should not enter the policy loss."""

    label: str
    reward: float
    env_error: bool
    verifier_evidence: Any = None
    judge_reasoning: str | None = None
    verdict: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "reward": self.reward, "env_error": self.env_error,
                "verifier_evidence": self.verifier_evidence, "judge_reasoning": self.judge_reasoning,
                "verdict": self.verdict, "error": self.error}


def reward_for(label: str, rewards: Any) -> float:
    """The reward of a label under ``RewardSettings`` (or a ``Settings`` holding them)."""
    rewards = getattr(rewards, "rewards", rewards)
    table = {"completed": rewards.completed, "partially_completed": rewards.partial,
             "agent_error": rewards.agent_error, "environment_error": rewards.environment_error,
             "format_error": rewards.format_error}
    if label not in table:
        raise ValueError(f"unknown outcome label {label!r}; labels: {', '.join(LABELS)}")
    return float(table[label])


def _outcome(label: str, settings: Any, **kw: Any) -> Outcome:
    return Outcome(label=label, reward=reward_for(label, settings), env_error=label == "environment_error", **kw)


def verify_episode(pool: Any, environment: Environment, task_idx: int, episode: Episode, settings: Any,
                   judge: "LLMJudge | None" = None) -> Outcome:
    """Label and reward of ``episode`` on task ``task_idx`` of ``environment``.

    ``pool`` is the runtime's ``SandboxPool`` (its ``verify`` runs the verifier code in a worker).
    """
    if episode.termination == "format_error":
        return _outcome("format_error", settings, error=episode.error)
    if episode.termination == "user_error":  # the user simulator failed: not the agent's doing
        return _outcome("environment_error", settings, error=episode.error or "the user simulator failed")
    if episode.environment_error or episode.final_snapshot is None:
        return _outcome("environment_error", settings, error=episode.error or "the environment failed")
    verifier = environment.verifier(task_idx)
    if verifier is None:
        raise AWMError(f"{environment.id} has no verifier for task {task_idx}; it cannot be evaluated")
    trace = None
    if verifier.style == "bfcl":
        trace = bfcl_trace(episode)
    elif verifier.style == "tau2":
        from awm_core.interop.tau2 import trajectory

        trace = trajectory(episode)
    v = pool.verify(environment, task_idx, initial_db=episode.initial_snapshot, final_db=episode.final_snapshot,
                    final_answer=episode.final_answer, trace=trace)
    if v.error_kind == "environment" or (v.verdict is None and v.error):
        return _outcome("environment_error", settings, verifier_evidence=v.evidence,
                        error=f"verifier failed: {v.error or 'no verdict'}")
    if judge is None or verifier.style in BENCHMARKS:  # the benchmark's own checker is the whole rule: no judge
        if v.verdict is None:
            # awm1k_sql verifiers only gather evidence: without a judge nothing can decide.
            return _outcome("environment_error", settings, verifier_evidence=v.evidence,
                            error=f"the {verifier.style} verifier gives evidence but no verdict; run with a judge")
        return _outcome(VERDICT_LABELS[v.verdict], settings, verifier_evidence=v.evidence, verdict=v.verdict)
    decision = judge.classify(environment=environment, task_idx=task_idx, verifier=verifier,
                              verdict=v.verdict, evidence=v.evidence, episode=episode)
    if decision.error is not None:
        # A judge that cannot answer is not the agent's fault: fall back to the code verdict when
        # there is one, otherwise flag the episode so training skips it.
        if v.verdict is not None:
            return _outcome(VERDICT_LABELS[v.verdict], settings, verifier_evidence=v.evidence, verdict=v.verdict,
                            judge_reasoning=None, error=f"judge failed, used the verifier verdict: {decision.error}")
        return _outcome("environment_error", settings, verifier_evidence=v.evidence, error=f"judge failed: {decision.error}")
    return _outcome(decision.classification, settings, verifier_evidence=v.evidence, verdict=v.verdict,
                    judge_reasoning=decision.reasoning)


def bfcl_trace(episode: Episode) -> list[list[list[str]]]:
    """The agent's calls as BFCL's checker reads them: per user turn, per reply, ``f(a=1)`` strings.

    A user turn the agent never answered (the episode ran out of replies) is left out, so BFCL
    scores the episode as force-terminated, as its own runner does.
    """
    turns = episode.calls_by_user_turn()
    if episode.termination != "final_answer":
        turns = turns[:-1]
    return [[[call_string(c.tool, c.arguments) for c in step] for step in turn] for turn in turns]


def verify_and_reward(pool: Any, environment: Environment, episode: Episode, settings: Any,
                      judge: "LLMJudge | None" = None) -> Outcome:
    """``verify_episode`` for an episode that was run on a ``Task`` (it knows its task index)."""
    if episode.task_idx is None:
        raise ValueError("the episode was run on task text, not a Task: call verify_episode with the task index")
    return verify_episode(pool, environment, episode.task_idx, episode, settings, judge=judge)


# --------------------------------------------------------------------------- judge

JUDGE_SYSTEM = """You judge whether an agent completed a task in a simulated application backed by a SQLite database.
You get the task, the verifier code written for it, what that code found when run on the database before and after the episode (its evidence and verdict), the success and failure criteria, and a summary of the agent's trajectory.
The verifier may be incomplete or wrong: weigh its evidence against the trajectory.
Classify the episode as exactly one of:
- completed: every part of the task was done and the database (or the final answer) shows it;
- partially_completed: real progress, but some required part is missing or wrong;
- agent_error: the agent failed through its own mistakes (wrong tools or arguments, invented values, gave up, wrong answer);
- environment_error: the application itself failed (server errors, a tool that cannot serve a valid call), so the agent could not succeed.
Reply with one JSON object only: {"classification": "<one of the four>", "reasoning": "<two or three sentences>"}"""


@dataclass
class JudgeDecision:
    classification: str | None
    reasoning: str | None = None
    error: str | None = None
    raw: str | None = field(default=None, repr=False)


def trajectory_summary(episode: Episode, *, max_chars: int = 6000, result_chars: int = 300) -> str:
    """A compact, readable account of the episode for the judge (long results are cut)."""
    lines = []
    for t in episode.turns:
        if t.format_error:
            lines.append(f"{t.index + 1}. malformed reply ({t.format_error_kind}): {t.raw[:result_chars]!r}")
            continue
        if not t.results:
            lines.append(f"{t.index + 1}. final answer: {t.raw[:1000]}")
            continue
        for c, r in zip(t.calls, t.results):
            shown = json.dumps(r.content, ensure_ascii=False, default=str) if r.ok else f"ERROR ({r.error_kind}): {r.error}"
            if len(shown) > result_chars:
                shown = shown[:result_chars] + "..."
            lines.append(f"{t.index + 1}. {c.name}({json.dumps(c.arguments, ensure_ascii=False)}) -> {shown}")
    lines.append(f"episode ended: {episode.termination}" + (f" ({episode.error})" if episode.error else ""))
    text = "\n".join(lines)
    return text if len(text) <= max_chars else text[: max_chars // 2] + "\n...\n" + text[-max_chars // 2:]


def judge_messages(task_text: str, verifier: Verifier, verdict: str | None, evidence: Any,
                   episode: Episode) -> list[dict[str, str]]:
    evidence_text = json.dumps(evidence, ensure_ascii=False, default=str, indent=1)
    if len(evidence_text) > 8000:
        evidence_text = evidence_text[:8000] + "\n... (cut)"
    user = (f"## Task\n{task_text}\n\n"
            f"## Verifier code ({verifier.style}, entry point {verifier.function_name})\n```python\n{verifier.code}\n```\n\n"
            f"## Success criteria\n{verifier.success_criteria or '(not given)'}\n\n"
            f"## Failure criteria\n{verifier.failure_criteria or '(not given)'}\n\n"
            f"## Verifier result\nverdict: {verdict if verdict is not None else '(none: evidence only)'}\n"
            f"evidence:\n{evidence_text}\n\n"
            f"## Trajectory ({len(episode.turns)} turns)\n{trajectory_summary(episode)}\n\n"
            f"## Final answer\n{episode.final_answer if episode.final_answer is not None else '(none)'}")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_judge_reply(text: str) -> JudgeDecision:
    """Read ``{"classification", "reasoning"}``; a bad reply gives a decision with ``error`` set."""
    from awm_core.llm.structured import ReplyProblem, parse_json_reply

    try:
        data = parse_json_reply(text)
    except ReplyProblem as exc:
        return JudgeDecision(None, error=f"judge reply is not JSON: {exc.summary}", raw=text)
    if not isinstance(data, dict):
        return JudgeDecision(None, error="judge reply is not a JSON object", raw=text)
    label = data.get("classification")
    if label not in JUDGE_LABELS:
        return JudgeDecision(None, error=f"judge classification {label!r} is not one of {', '.join(JUDGE_LABELS)}",
                             raw=text)
    reasoning = data.get("reasoning")
    return JudgeDecision(label, reasoning if isinstance(reasoning, str) else json.dumps(reasoning), raw=text)


class LLMJudge:
    """The code-augmented judge through ``awm_core.llm.LLMClient`` (role ``judge``, stage ``judge``).

    Calls go to the judge role's back end: an OpenAI-compatible endpoint, or the recorded
    fixtures ``<fixtures_dir>/<env_id>/judge.json`` offline.
    """

    STAGE = "judge"

    def __init__(self, client: Any):
        self.client = client

    @classmethod
    def from_settings(cls, settings: Any, *, budget: Any = None, ledger: Any = None) -> "LLMJudge":
        from awm_core.llm import LLMClient

        return cls(LLMClient.for_role(settings, "judge", budget=budget, ledger=ledger))

    def classify(self, *, environment: Environment, task_idx: int, verifier: Verifier, verdict: str | None,
                 evidence: Any, episode: Episode) -> JudgeDecision:
        messages = judge_messages(environment.task(task_idx).text, verifier, verdict, evidence, episode)
        try:
            res = self.client.chat(messages, stage=self.STAGE, scenario_id=environment.id, attempt=1, json_mode=True)
        except AWMError as exc:
            return JudgeDecision(None, error=f"{type(exc).__name__}: {exc}")
        return parse_judge_reply(res.content or "")
