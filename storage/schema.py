"""The catalog's tables: one definition drives DDL, comments, row conversion and the docs.

Each column is ``(name, sql type, comment, required)``. ``required`` columns are NOT NULL in
DuckLake (the only constraint DuckLake enforces); keys are listed per table and the publisher
enforces them by replacing rows with the same key (upsert) or skipping them (append-only logs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

SCHEMA_VERSION = 2  # 2: tasks.user_scenario/reason_for_call/known_info, environments.policy, rollouts.mode


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    comment: str
    required: bool = False


@dataclass(frozen=True)
class Table:
    name: str
    comment: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    # "replace": a row whose key exists replaces it; "skip": an existing key is kept (idempotent logs)
    on_conflict: str = "replace"
    example: str = ""
    column_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "column_names", tuple(c.name for c in self.columns))

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)


def C(name: str, type_: str, comment: str, required: bool = False) -> Column:
    return Column(name, type_, comment, required)


ENV = C("env_id", "VARCHAR", "environment id = scenario id (slug)", True)

TABLES: dict[str, Table] = {t.name: t for t in [
    Table("scenarios", "One row per environment: the scenario it implements.", (
        ENV,
        C("name", "VARCHAR", "scenario name as generated or imported", True),
        C("description", "VARCHAR", "one-paragraph description of the application"),
        C("category", "VARCHAR", "scenario category (AWM-1K: the name without its trailing number)"),
        C("extra", "JSON", "fields kept from imports (AWM-1K bookkeeping)"),
        C("published_at", "TIMESTAMPTZ", "when this row was published", True),
    ), key=("env_id",),
        example="SELECT category, count(*) AS envs FROM scenarios GROUP BY category ORDER BY envs DESC"),
    Table("tasks", "User tasks of each environment.", (
        ENV,
        C("task_idx", "INTEGER", "0-based index within the environment", True),
        C("task_id", "VARCHAR", "'<env_id>/<task_idx>'", True),
        C("text", "VARCHAR", "the task as given to the agent", True),
        C("has_verifier", "BOOLEAN", "a verifier exists for this task"),
        C("has_solution", "BOOLEAN", "a reference solution exists for this task"),
        C("dropped_reason", "VARCHAR", "why validation dropped the task (NULL = kept)"),
        C("retired_reason", "VARCHAR", "why curation retired the task (NULL = live): solved by every policy, or "
                                       "never solved while its reference solution passes"),
        C("user_scenario", "JSON", "who the user is and what they want, played by the user simulator in a "
                                   "conversation (tau2-bench's shape: {persona, instructions: {domain, "
                                   "reason_for_call, known_info, unknown_info, task_instructions}}); NULL = none"),
        C("reason_for_call", "VARCHAR", "user_scenario.instructions.reason_for_call (NULL = no user scenario)"),
        C("known_info", "VARCHAR", "user_scenario.instructions.known_info: what the user can tell the agent"),
    ), key=("env_id", "task_idx"),
        example="SELECT env_id, count(*) FILTER (WHERE dropped_reason IS NULL) AS kept, "
                "count(user_scenario) AS with_user_scenario FROM tasks GROUP BY env_id"),
    Table("environments", "The Environment bundle of each scenario, whole and in parts.", (
        ENV,
        C("name", "VARCHAR", "scenario name"),
        C("category", "VARCHAR", "scenario category"),
        C("flavour", "VARCHAR", "code flavour: native | awm1k | bfcl | tau2", True),
        C("source", "VARCHAR", "generated | awm1k | bfcl | tau2 | handwritten", True),
        C("digest", "VARCHAR", "sha256 of the bundle without provenance and validation", True),
        C("tool_count", "INTEGER", "tools in the API spec", True),
        C("task_count", "INTEGER", "tasks in the bundle", True),
        C("verifier_count", "INTEGER", "verifiers in the bundle", True),
        C("table_count", "INTEGER", "tables in the database schema", True),
        C("seed_statement_count", "INTEGER", "INSERT statements of the seed data", True),
        C("missing", "VARCHAR[]", "bundle parts absent from an import", True),
        C("validation_passed", "BOOLEAN", "overall validation verdict (NULL = never validated)"),
        C("db_schema", "JSON", "DbSchema part"),
        C("seed_data", "JSON", "SeedData part"),
        C("api_spec", "JSON", "ApiSpec part"),
        C("code", "VARCHAR", "environment code (one Python module)"),
        C("generator_model", "VARCHAR", "model that generated the bundle"),
        C("prompt_version", "VARCHAR", "prompt version of the generator"),
        C("run_id", "VARCHAR", "generation run that made the bundle"),
        C("total_tokens", "BIGINT", "LLM tokens spent on the bundle"),
        C("cost_usd", "DOUBLE", "estimated LLM cost of the bundle"),
        C("created_at", "TIMESTAMPTZ", "when the bundle was made"),
        C("published_at", "TIMESTAMPTZ", "when this row was published", True),
        C("bundle", "JSON", "the whole Environment bundle (what `awm env export` writes)", True),
        C("policy", "VARCHAR", "the agent's policy in a conversation (what needs the user's confirmation, what "
                               "is never allowed); NULL = none"),
    ), key=("env_id",),
        example="SELECT env_id, flavour, tool_count, task_count, missing FROM environments ORDER BY env_id"),
    Table("verifiers", "Verifier code per task (AWM-1K scenarios may carry two styles per task).", (
        ENV,
        C("task_idx", "INTEGER", "task the verifier checks", True),
        C("style", "VARCHAR", "native | awm1k_code | awm1k_sql", True),
        C("function_name", "VARCHAR", "entry point in the code", True),
        C("code", "VARCHAR", "verifier source", True),
        C("success_criteria", "VARCHAR", "for judge-based styles"),
        C("failure_criteria", "VARCHAR", "for judge-based styles"),
        C("extra", "JSON", "fields kept from imports"),
    ), key=("env_id", "task_idx", "style"),
        example="SELECT style, count(*) FROM verifiers GROUP BY style"),
    Table("reference_solutions", "Reference tool-call sequences that solve a task.", (
        ENV,
        C("task_idx", "INTEGER", "task the solution solves", True),
        C("calls", "JSON", "list of {tool, arguments}", True),
        C("call_count", "INTEGER", "number of tool calls", True),
        C("final_answer", "VARCHAR", "final answer the agent should give, if any"),
    ), key=("env_id", "task_idx"),
        example="SELECT env_id, avg(call_count) AS mean_calls FROM reference_solutions GROUP BY env_id"),
    Table("validation_results", "Every check of each environment's ValidationReport.", (
        ENV,
        C("check_idx", "INTEGER", "position of the check in the report", True),
        C("name", "VARCHAR", "schema, seed, tool_example, verifier_solution, verifier_noop, replay_determinism, ...", True),
        C("passed", "BOOLEAN", "check verdict", True),
        C("task_idx", "INTEGER", "task the check concerns (NULL = whole environment)"),
        C("tool", "VARCHAR", "tool the check concerns"),
        C("detail", "VARCHAR", "error text or evidence"),
        C("validated_at", "TIMESTAMPTZ", "when the report was made"),
    ), key=("env_id", "check_idx"),
        example="SELECT name, avg(passed::INT) AS pass_rate FROM validation_results GROUP BY name"),
    Table("llm_calls", "Every LLM call, failed or not (the run ledgers).", (
        C("call_id", "VARCHAR", "unique id of the call", True),
        C("run_id", "VARCHAR", "run that made the call"),
        C("role", "VARCHAR", "generator | judge | embedder | policy"),
        C("stage", "VARCHAR", "synthesis stage (scenario, tasks, schema, ..., verifier.3)"),
        C("scenario_id", "VARCHAR", "scenario the call worked on ('_' = run-wide)"),
        C("attempt", "INTEGER", "1-based attempt of the stage"),
        C("model", "VARCHAR", "model name"),
        C("prompt_tokens", "BIGINT", "prompt tokens"),
        C("completion_tokens", "BIGINT", "completion tokens"),
        C("latency_s", "DOUBLE", "wall time of the call"),
        C("cost_usd", "DOUBLE", "estimated cost"),
        C("cached", "BOOLEAN", "answered from the response cache"),
        C("error", "VARCHAR", "error text (NULL = success)"),
        C("created_at", "TIMESTAMPTZ", "when the call finished", True),
    ), key=("call_id",), on_conflict="skip",
        example="SELECT stage, count(*) FILTER (WHERE error IS NOT NULL) AS failures FROM llm_calls GROUP BY stage"),
    Table("generation_runs", "One row per generation run (updated when the run ends).", (
        C("run_id", "VARCHAR", "run id", True),
        C("flow_run_id", "VARCHAR", "Prefect flow run id"),
        C("status", "VARCHAR", "completed | partial | failed | budget_exceeded", True),
        C("started_at", "TIMESTAMPTZ", "start time"),
        C("finished_at", "TIMESTAMPTZ", "end time"),
        C("params", "JSON", "flow parameters"),
        C("envs_published", "INTEGER", "environments published by the run"),
        C("envs_dropped", "INTEGER", "scenarios dropped by the run"),
        C("drop_reasons", "JSON", "scenario id -> reason"),
        C("tokens", "BIGINT", "LLM tokens spent"),
        C("cost_usd", "DOUBLE", "estimated LLM cost"),
        C("message", "VARCHAR", "summary"),
    ), key=("run_id",),
        example="SELECT run_id, status, envs_published, cost_usd FROM generation_runs ORDER BY started_at DESC LIMIT 5"),
    Table("rollouts", "One row per evaluated or trained episode.", (
        C("rollout_id", "VARCHAR", "unique id of the episode", True),
        C("run_id", "VARCHAR", "evaluation or training run", True),
        C("snapshot", "BIGINT", "catalog snapshot the environment came from"),
        ENV,
        C("task_idx", "INTEGER", "task index", True),
        C("split", "VARCHAR", "train | val | test"),
        C("policy", "VARCHAR", "policy kind (e.g. llm, checkpoint, scripted)"),
        C("model", "VARCHAR", "model or checkpoint name"),
        C("episode_idx", "INTEGER", "repeat index of the same task"),
        C("reward", "DOUBLE", "episode reward (settings.rewards)", True),
        C("label", "VARCHAR", "completed | partially_completed | agent_error | environment_error | format_error", True),
        C("env_error", "BOOLEAN", "environment's fault (left out of the loss)", True),
        C("turns", "INTEGER", "agent turns"),
        C("prompt_tokens", "BIGINT", "policy prompt tokens"),
        C("completion_tokens", "BIGINT", "policy completion tokens"),
        C("tool_calls", "INTEGER", "tool calls made"),
        C("duration_s", "DOUBLE", "wall time of the episode"),
        C("env_time_s", "DOUBLE", "time spent inside the environment"),
        C("initial_digest", "VARCHAR", "digest of the initial database"),
        C("final_digest", "VARCHAR", "digest of the final database"),
        C("final_answer", "VARCHAR", "agent's final answer"),
        C("error", "VARCHAR", "error text"),
        C("termination", "VARCHAR", "final_answer | max_turns | format_error | environment_error; conversations: "
                                     "user_stop | max_steps | too_many_errors | user_error"),
        C("interface", "VARCHAR", "direct (environment tools) | meta (list_tools + call_tool)"),
        C("mode", "VARCHAR", "message (the task as one user message, maybe with scripted follow-ups) | "
                             "conversation (a user simulator plays the task's user_scenario); NULL = message"),
        C("window", "INTEGER", "history window the policy saw (NULL = full history)"),
        C("verifier_evidence", "JSON", "what the task's verifier checked"),
        C("judge_reasoning", "VARCHAR", "the LLM judge's reasoning, when a judge was used"),
        C("messages_json", "JSON", "the full conversation"),
        C("created_at", "TIMESTAMPTZ", "when the episode ended", True),
    ), key=("rollout_id",), on_conflict="skip",
        example="SELECT model, snapshot, avg(reward) FROM rollouts GROUP BY ALL ORDER BY ALL"),
    Table("tool_calls", "Optional per-tool-call timings of rollouts (for latency analysis).", (
        C("rollout_id", "VARCHAR", "episode", True),
        C("call_idx", "INTEGER", "position in the episode", True),
        ENV,
        C("tool", "VARCHAR", "tool name", True),
        C("ok", "BOOLEAN", "call succeeded"),
        C("error_kind", "VARCHAR", "tool | invalid_arguments | unknown_tool | environment"),
        C("latency_s", "DOUBLE", "wall time of the call"),
        C("created_at", "TIMESTAMPTZ", "when the call ended", True),
    ), key=("rollout_id", "call_idx"), on_conflict="skip",
        example="SELECT env_id, tool, median(latency_s) FROM tool_calls GROUP BY ALL ORDER BY 3 DESC LIMIT 10"),
    Table("quality_reports", "Quality-gate results, one row per gate run.", (
        C("report_id", "VARCHAR", "unique id", True),
        C("snapshot", "BIGINT", "snapshot that was validated", True),
        C("passed", "BOOLEAN", "gate verdict", True),
        C("statistics", "JSON", "counts: evaluated, successful, unsuccessful expectations, scope"),
        C("results", "JSON", "one entry per expectation with its outcome"),
        C("created_at", "TIMESTAMPTZ", "when the gate ran", True),
    ), key=("report_id",),
        example="SELECT snapshot, passed, created_at FROM quality_reports ORDER BY created_at DESC"),
    Table("training_runs", "Per-step metrics of training runs.", (
        C("run_id", "VARCHAR", "training run", True),
        C("step", "INTEGER", "optimizer step", True),
        C("snapshot", "BIGINT", "catalog snapshot trained on"),
        C("reward_mean", "DOUBLE", "mean episode reward"),
        C("reward_std", "DOUBLE", "reward standard deviation"),
        C("completion_rate", "DOUBLE", "share of completed episodes"),
        C("format_error_rate", "DOUBLE", "share of format errors"),
        C("env_error_rate", "DOUBLE", "share of environment errors"),
        C("kl", "DOUBLE", "KL to the reference policy"),
        C("tokens", "BIGINT", "tokens processed in the step"),
        C("rollout_s", "DOUBLE", "seconds spent on rollouts"),
        C("update_s", "DOUBLE", "seconds spent on the update"),
        C("config_json", "JSON", "training configuration"),
        C("checkpoint", "VARCHAR", "checkpoint path written at this step"),
        C("created_at", "TIMESTAMPTZ", "when the step finished", True),
    ), key=("run_id", "step"),
        example="SELECT run_id, max(step), last(reward_mean ORDER BY step) FROM training_runs GROUP BY run_id"),
    Table("splits", "Train/val/test assignment of tasks, per catalog snapshot.", (
        C("snapshot", "BIGINT", "snapshot the split was made for", True),
        ENV,
        C("task_idx", "INTEGER", "task index", True),
        C("split", "VARCHAR", "train | val | test", True),
        C("seed", "BIGINT", "seed of the split"),
    ), key=("snapshot", "env_id", "task_idx"),
        example="SELECT split, count(*) FROM splits WHERE snapshot = 3 GROUP BY split"),
    Table("task_telemetry", "Per task and policy, what evaluation and training runs saw (the nightly "
                            "curation reads it: awm curate).", (
        C("run_id", "VARCHAR", "run that observed it", True),
        ENV,
        C("task_idx", "INTEGER", "task index", True),
        C("kind", "VARCHAR", "stats (the numbers below) | always_solved | never_solved | env_errors", True),
        C("count", "INTEGER", "episodes observed (stats), or episodes with the flag", True),
        C("policy", "VARCHAR", "policy of the run: reference, random, openai, openai-text, grpo"),
        C("episodes", "INTEGER", "stats: episodes of this task in the run"),
        C("completed", "INTEGER", "stats: episodes labelled completed"),
        C("pass_rate", "DOUBLE", "stats: completed / episodes without an environment error"),
        C("env_error_rate", "DOUBLE", "stats: share of episodes with an environment error"),
        C("format_error_rate", "DOUBLE", "stats: share of episodes labelled format_error"),
        C("mean_turns", "DOUBLE", "stats: mean policy turns per episode"),
        C("created_at", "TIMESTAMPTZ", "when the run published it"),
    ), key=("run_id", "env_id", "task_idx", "kind"),
        example="SELECT env_id, task_idx, policy, pass_rate, env_error_rate FROM task_telemetry WHERE kind = 'stats'"),
    Table("publishes", "One row that every publish updates. DuckLake lets two transactions that both insert a "
                       "key neither saw both commit; since each publish also rewrites this row, two publishes "
                       "that overlap always conflict, and the later one is re-run over the earlier one's snapshot.", (
        C("id", "INTEGER", "always 1", True),
        C("publishes", "BIGINT", "publishes committed so far (counted from this table's creation)", True),
        C("last_message", "VARCHAR", "message of the latest publish"),
        C("last_at", "TIMESTAMPTZ", "when the latest publish began committing"),
    ), key=("id",), example="SELECT publishes, last_message, last_at FROM publishes"),
]}

# Tables whose rows belong to one environment and are replaced when it is republished.
ENV_TABLES = ("scenarios", "tasks", "environments", "verifiers", "reference_solutions", "validation_results")


def ddl(catalog: str, table: Table) -> list[str]:
    cols = ", ".join(f'"{c.name}" {c.type}{" NOT NULL" if c.required else ""}' for c in table.columns)
    out = [f'CREATE TABLE IF NOT EXISTS {catalog}."{table.name}" ({cols})',
           f"COMMENT ON TABLE {catalog}.\"{table.name}\" IS {sql_str(table.comment)}"]
    out += [f'COMMENT ON COLUMN {catalog}."{table.name}"."{c.name}" IS {sql_str(c.comment)}' for c in table.columns]
    return out


def sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def markdown() -> str:
    """The table reference for docs/catalog.md (generated so it never drifts from the DDL)."""
    parts = []
    for t in TABLES.values():
        parts.append(f"### `{t.name}`\n\n{t.comment} Key: `({', '.join(t.key)})`"
                     f" ({'replaced on republish' if t.on_conflict == 'replace' else 'existing keys kept'}).\n")
        parts.append("| column | type | | description |\n|---|---|---|---|")
        parts += [f"| `{c.name}` | {c.type} | {'not null' if c.required else ''} | {c.comment} |" for c in t.columns]
        parts.append(f"\n```sql\n{t.example}\n```\n")
    return "\n".join(parts)
