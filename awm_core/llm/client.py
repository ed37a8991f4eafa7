"""One LLM client for every role: http (any OpenAI-compatible endpoint) or offline (fixtures).

Each call goes: response cache -> budget check -> backend (with backoff on transient
failures) -> accounting. Every call, and every failed transport try, becomes one
``CallRecord`` line in the ledger before the result (or exception) reaches the caller.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from awm_core.errors import BudgetExceeded, LLMError, StructuredOutputError
from awm_core.llm.cache import ResponseCache, request_key
from awm_core.llm.offline import (
    FixtureReply,
    estimate_prompt_tokens,
    estimate_tokens,
    fixture_digest,
    load_fixture,
    normalise_tool_calls,
    record_fixture,
)
from awm_core.llm.records import Budget, CallRecord, Hold, Ledger, call_cost
from awm_core.llm.structured import ReplyProblem, check_finish, parse_json_reply, validate_reply
from awm_core.settings import RoleSettings, Settings

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

RETRYABLE_STATUS = {408, 409, 429}
MAX_BACKOFF_S = 60.0


@dataclass
class LLMResult:
    content: str
    tool_calls: list[dict[str, Any]]
    finish_reason: str
    record: CallRecord


@dataclass
class Structured(Generic[M]):
    value: M
    record: CallRecord


class _TransportFailure(Exception):
    def __init__(self, message: str, retryable: bool, retry_after_s: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s


# One lock per ledger file, so clients of different roles sharing a ledger never interleave lines.
_ledger_registry: dict[Path, Ledger] = {}
_ledger_registry_lock = threading.Lock()


def _ledger_for(ledger: str | os.PathLike | Ledger | None) -> Ledger | None:
    if ledger is None or isinstance(ledger, Ledger):
        return ledger
    path = Path(ledger).resolve()
    with _ledger_registry_lock:
        return _ledger_registry.setdefault(path, Ledger(path))


class LLMClient:
    """Chat and structured-output calls for one role, with accounting, cache and budget."""

    def __init__(self, settings: Settings, role_name: str, *, budget: Budget | Any | None = None,
                 ledger: str | os.PathLike | Ledger | None = None, run_id: str | None = None):
        self.settings = settings
        self.role_name = role_name
        self.role: RoleSettings = settings.role(role_name)
        self.model = self.role.model
        self.budget = budget
        self.ledger = _ledger_for(ledger)
        self.run_id = run_id
        self.cache = ResponseCache(settings.cache_dir) if settings.llm.cache else None
        self._http = None
        self._http_lock = threading.Lock()

    @classmethod
    def for_role(cls, settings: Settings, role: str, budget: Budget | None = None,
                 ledger: str | os.PathLike | Ledger | None = None, run_id: str | None = None) -> "LLMClient":
        return cls(settings, role, budget=budget, ledger=ledger, run_id=run_id)

    # ------------------------------------------------------------------ public calls

    def chat(self, messages: list[dict[str, Any]], *, stage: str, scenario_id: str | None, attempt: int,
             json_mode: bool = False, tools: list[dict[str, Any]] | None = None, max_tokens: int | None = None,
             temperature: float | None = None) -> LLMResult:
        """One completion. ``finish_reason`` is passed through: callers decide what "length" means."""
        reply, record = self._call(messages, stage=stage, scenario_id=scenario_id, attempt=attempt,
                                   json_mode=json_mode, tools=tools, max_tokens=max_tokens, temperature=temperature)
        self._write(record)
        return LLMResult(reply.content, reply.tool_calls, reply.finish_reason, record)

    def structured(self, messages: list[dict[str, Any]], model_cls: type[M], *, stage: str,
                   scenario_id: str | None, attempt: int, **kw: Any) -> Structured[M]:
        """Ask for JSON, parse it (a ```json fence is fine), validate it against ``model_cls``.

        Raises ``StructuredOutputError`` for a truncated, malformed or invalid reply; its
        message is meant to be shown to the model in the next attempt's prompt.
        """
        kw.setdefault("json_mode", True)
        reply, record = self._call(messages, stage=stage, scenario_id=scenario_id, attempt=attempt, **kw)
        try:
            check_finish(reply.finish_reason, reply.completion_tokens)
            value = validate_reply(parse_json_reply(reply.content), model_cls)
        except ReplyProblem as exc:
            record.error = f"structured output: {exc}"
            self._write(record)
            raise StructuredOutputError(str(exc), record, problems=[exc.summary, *exc.problems] if exc.problems
                                        else [exc.summary], content=reply.content) from None
        self._write(record)
        return Structured(value, record)

    # ------------------------------------------------------------------ internals

    def _record(self, *, stage: str, scenario_id: str | None, attempt: int, **fields: Any) -> CallRecord:
        return CallRecord(run_id=self.run_id, role=self.role_name, stage=stage, scenario_id=scenario_id or "_",
                          attempt=attempt, model=self.model, **fields)

    def _write(self, record: CallRecord) -> None:
        if self.ledger is not None:
            self.ledger.append(record)

    def _fail(self, exc: LLMError, record: CallRecord) -> LLMError:
        exc.record = record  # type: ignore[attr-defined]
        self._write(record)
        return exc

    def _call(self, messages: list[dict[str, Any]], *, stage: str, scenario_id: str | None, attempt: int,
              json_mode: bool = False, tools: list[dict[str, Any]] | None = None, max_tokens: int | None = None,
              temperature: float | None = None) -> tuple[FixtureReply, CallRecord]:
        if not isinstance(attempt, int) or attempt < 1:
            raise LLMError(f"attempt must be an integer >= 1, got {attempt!r}")
        keys = {"stage": stage, "scenario_id": scenario_id, "attempt": attempt}
        request = {
            "backend": self.role.backend, "model": self.model, "messages": messages, "tools": tools,
            "json_mode": json_mode, "max_tokens": max_tokens if max_tokens is not None else self.role.max_tokens,
            "temperature": temperature if temperature is not None else self.role.temperature, **keys,
        }
        if self.role.backend == "offline" and self.cache:
            # Replies follow the fixture file, so an edited recording is never masked by the cache.
            request["fixture"] = fixture_digest(self.settings.llm.fixtures_dir, scenario_id, stage)

        key = request_key(request) if self.cache else None
        if self.cache:
            started = time.perf_counter()
            hit = self.cache.get(key)
            if hit is not None:
                record = self._record(**keys, prompt_tokens=hit.prompt_tokens,
                                      completion_tokens=hit.completion_tokens,
                                      latency_s=time.perf_counter() - started, cost_usd=0.0, cached=True)
                self._maybe_record_fixture(keys, hit)
                return hit, record

        hold = self._reserve(request, keys)
        try:
            if self.role.backend == "offline":
                reply, record = self._offline(request, keys)
            else:
                reply, record = self._http_with_retries(request, keys)
        except BaseException:
            if hold is not None:  # a failed call is not charged: give its reservation back
                self._settle(hold, 0.0, called=False)
            raise

        record.cost_usd = call_cost(self.settings.llm.prices, self.model, reply.prompt_tokens, reply.completion_tokens)
        if hold is not None:
            self._settle(hold, record.cost_usd)
        if self.cache:
            self.cache.put(key, reply, request)
        self._maybe_record_fixture(keys, reply)
        return reply, record

    def _reserve(self, request: dict[str, Any], keys: dict[str, Any]) -> Hold | None:
        """Set the call's most likely top cost aside (a shared budget counts it against the cap for
        every worker until the call settles), or refuse the call when the cap is reached."""
        if self.budget is None:
            return None
        estimate = call_cost(self.settings.llm.prices, self.model, estimate_prompt_tokens(request["messages"]),
                             request["max_tokens"])
        try:
            return self.budget.reserve(estimate)
        except BudgetExceeded as exc:
            raise self._fail(exc, self._record(**keys, error=f"budget exceeded: {exc}")) from None
        except LLMError as exc:
            raise self._fail(exc, self._record(**keys, error=f"budget: {exc}")) from None

    def _settle(self, hold: Hold, cost_usd: float, called: bool = True) -> None:
        """Settle a reservation; when a shared budget cannot be reached the reply is still returned
        (and recorded in the ledger) and the reservation stays counted against the cap."""
        try:
            self.budget.settle(hold, cost_usd, called=called)
        except LLMError as exc:
            log.warning("could not settle an LLM call's cost (its reservation of $%.4f stays counted): %s",
                        hold.estimate_usd, exc)

    def _maybe_record_fixture(self, keys: dict[str, Any], reply: FixtureReply) -> None:
        record_dir = self.settings.llm.record_dir
        if record_dir is not None and self.role.backend == "http":
            record_fixture(record_dir, keys["scenario_id"], keys["stage"], keys["attempt"], reply)

    def _offline(self, request: dict[str, Any], keys: dict[str, Any]) -> tuple[FixtureReply, CallRecord]:
        started = time.perf_counter()
        try:
            reply = load_fixture(self.settings.llm.fixtures_dir, keys["scenario_id"], keys["stage"],
                                 keys["attempt"], request["messages"])
        except LLMError as exc:
            raise self._fail(exc, self._record(**keys, latency_s=time.perf_counter() - started,
                                               error=f"offline: {exc}")) from None
        if self.settings.llm.offline_latency_s > 0:
            time.sleep(self.settings.llm.offline_latency_s)
        return reply, self._record(**keys, prompt_tokens=reply.prompt_tokens,
                                   completion_tokens=reply.completion_tokens,
                                   latency_s=time.perf_counter() - started)

    # ------------------------------------------------------------------ http backend

    def _openai(self):
        with self._http_lock:
            if self._http is None:
                from openai import OpenAI

                api_key = self.role.api_key.get_secret_value() if self.role.api_key else None
                if api_key is None:
                    if self.role.base_url is None:
                        raise LLMError(
                            f"LLM role {self.role_name!r} uses the http backend but has neither base_url nor "
                            f"api_key: set AWM_LLM__{self.role_name.upper()}__BASE_URL (and __API_KEY) "
                            "or OPENAI_BASE_URL/OPENAI_API_KEY"
                        )
                    api_key = "unused"  # local OpenAI-compatible servers accept any key
                # Retries are ours (with ledger records per try), so the SDK must not retry too.
                self._http = OpenAI(base_url=self.role.base_url, api_key=api_key, max_retries=0,
                                    timeout=self.role.timeout_s)
            return self._http

    def _http_with_retries(self, request: dict[str, Any], keys: dict[str, Any]) -> tuple[FixtureReply, CallRecord]:
        client = self._openai()
        tries = 1 + max(0, self.settings.llm.max_http_retries)
        for i in range(1, tries + 1):
            started = time.perf_counter()
            try:
                reply = self._http_once(client, request, keys)
                return reply, self._record(**keys, prompt_tokens=reply.prompt_tokens,
                                           completion_tokens=reply.completion_tokens,
                                           latency_s=time.perf_counter() - started)
            except _TransportFailure as failure:
                latency = time.perf_counter() - started
                if not failure.retryable or i == tries:
                    why = "not retryable" if not failure.retryable else f"gave up after {tries} tries"
                    msg = f"{self.role_name} call for {keys['stage']}[{keys['scenario_id'] or '_'}] failed: {failure} ({why})"
                    raise self._fail(LLMError(msg), self._record(**keys, latency_s=latency,
                                                                 error=f"http: {failure} ({why})")) from None
                delay = self._backoff(i, failure.retry_after_s)
                self._write(self._record(**keys, latency_s=latency,
                                         error=f"http: {failure} (try {i}/{tries}, retrying in {delay:.2f}s)"))
                log.info("retrying %s[%s] in %.2fs after: %s", keys["stage"], keys["scenario_id"], delay, failure)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _backoff(self, try_no: int, retry_after_s: float | None) -> float:
        base = self.settings.llm.backoff_base_s * (2 ** (try_no - 1))
        delay = base * random.uniform(0.5, 1.0)  # jitter keeps parallel callers from retrying in step
        if retry_after_s is not None:
            delay = max(delay, retry_after_s)
        return min(delay, MAX_BACKOFF_S)

    def _http_once(self, client, request: dict[str, Any], keys: dict[str, Any]) -> FixtureReply:
        import openai

        kwargs: dict[str, Any] = {
            "model": self.model, "messages": request["messages"],
            "max_completion_tokens": request["max_tokens"], "temperature": request["temperature"],
            "extra_headers": {"X-AWM-Stage": keys["stage"], "X-AWM-Scenario": keys["scenario_id"] or "_",
                              "X-AWM-Attempt": str(keys["attempt"])},
            "timeout": self.role.timeout_s,
        }
        if request["tools"]:
            kwargs["tools"] = request["tools"]
        if request["json_mode"]:
            kwargs["response_format"] = {"type": "json_object"}
        try:
            resp = client.chat.completions.create(**kwargs)
        except openai.APITimeoutError:
            raise _TransportFailure(f"timed out after {self.role.timeout_s:g}s", True) from None
        except openai.APIConnectionError as exc:
            raise _TransportFailure(f"connection error: {exc}", True) from None
        except openai.APIStatusError as exc:
            status = exc.status_code
            retry_after = _retry_after(exc.response.headers.get("retry-after")) if exc.response is not None else None
            retryable = status in RETRYABLE_STATUS or status >= 500
            raise _TransportFailure(f"HTTP {status}: {exc.message}", retryable, retry_after) from None
        except openai.OpenAIError as exc:
            raise _TransportFailure(f"{type(exc).__name__}: {exc}", False) from None
        if isinstance(resp, str) or not getattr(resp, "choices", None):
            raise _TransportFailure(f"malformed response with no choices: {str(resp)[:200]!r}", True)
        choice = resp.choices[0]
        message = choice.message
        content = message.content or ""
        tool_calls = normalise_tool_calls([tc.model_dump(exclude_none=True) for tc in (message.tool_calls or [])])
        usage = resp.usage
        prompt = usage.prompt_tokens if usage else estimate_prompt_tokens(request["messages"])
        completion = usage.completion_tokens if usage else estimate_tokens(content)
        return FixtureReply(content=content, tool_calls=tool_calls,
                            finish_reason=choice.finish_reason or ("tool_calls" if tool_calls else "stop"),
                            prompt_tokens=prompt or 0, completion_tokens=completion or 0)


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
