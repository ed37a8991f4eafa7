"""The agent loop, policies, tool-call parsing, verification and rewards, and splits.

The same loop serves evaluation and training::

    from awm_core.agent import run_episode, ReferencePolicy, verify_episode
    with SandboxPool(settings.sandbox) as pool:
        env = pool.load(environment)
        session = env.open_session()
        episode = run_episode(ReferencePolicy(environment.solution(0)), session, environment.task(0),
                              env.tools(), interface="direct", max_turns=20, window=3)
        outcome = verify_episode(pool, environment, 0, episode, settings)   # label, reward, env_error

Training builds its per-step samples with ``visible_messages`` (what step t saw is
``episode.turns[t].visible``) and the episode's reward.

A conversation (tau2-bench's tasks; a synthesized task with a user scenario in mode ``conversation``,
``plays_as_conversation``) is played with a user simulator::

    user = ScriptedUser(task, solution)            # or LLMUser.for_task(settings, task, tools=env.user_tools())
    episode = run_episode(policy, session, task, env.tools(), user=user, user_tools=env.user_tools())
    episode.termination                            # "user_stop", "max_steps", "too_many_errors", ...
    episode.conversation                           # every party's messages, tagged with their sender
"""
from awm_core.agent.base import Policy, PolicyReply
from awm_core.agent.episode import Episode, ToolCallRequest, ToolCallResult, Turn, UserExchange
from awm_core.agent.interfaces import CALL_TOOL, LIST_TOOLS, META_TOOLS, ToolDef, ToolRouter, function_tool
from awm_core.agent.loop import (
    DEFAULT_MAX_ERRORS,
    DEFAULT_MAX_STEPS,
    DEFAULT_MAX_TURNS,
    DEFAULT_WINDOW,
    default_system_prompt,
    policy_system_prompt,
    render_tool_result,
    run_episode,
    visible_messages,
)
from awm_core.agent.parsing import FormatError, format_text_tool_call, parse_native_tool_calls, parse_text_tool_calls
from awm_core.agent.policies import (
    Generation,
    OpenAIChatPolicy,
    RandomPolicy,
    ReferencePolicy,
    TextToolCallPolicy,
    random_arguments,
)
from awm_core.agent.rewards import (
    LABELS,
    JudgeDecision,
    LLMJudge,
    Outcome,
    judge_messages,
    parse_judge_reply,
    reward_for,
    trajectory_summary,
    verify_and_reward,
    verify_episode,
)
from awm_core.agent.splits import make_splits, select
from awm_core.agent.users import (
    AGENT_GREETING,
    MODES,
    STOP_TOKENS,
    USER_KINDS,
    LLMUser,
    ScriptedUser,
    User,
    UserReply,
    check_conversation_mode,
    check_user_role,
    conversation_system_prompt,
    episode_mode,
    is_stop,
    plays_as_conversation,
    solution_ranges,
    user_for,
    user_view,
)

__all__ = [
    "AGENT_GREETING", "DEFAULT_MAX_ERRORS", "DEFAULT_MAX_STEPS", "LLMUser", "MODES", "STOP_TOKENS", "ScriptedUser",
    "User", "USER_KINDS", "UserExchange", "UserReply", "check_conversation_mode", "check_user_role",
    "conversation_system_prompt", "episode_mode", "is_stop", "plays_as_conversation", "policy_system_prompt",
    "solution_ranges", "user_for", "user_view",
    "CALL_TOOL", "DEFAULT_MAX_TURNS", "DEFAULT_WINDOW", "Episode", "FormatError", "Generation", "JudgeDecision",
    "LABELS", "LIST_TOOLS", "LLMJudge", "META_TOOLS", "OpenAIChatPolicy", "Outcome", "Policy", "PolicyReply",
    "RandomPolicy", "ReferencePolicy", "TextToolCallPolicy", "ToolCallRequest", "ToolCallResult", "ToolDef",
    "ToolRouter", "Turn", "default_system_prompt", "format_text_tool_call", "function_tool", "judge_messages",
    "make_splits", "parse_judge_reply", "parse_native_tool_calls", "parse_text_tool_calls", "random_arguments",
    "render_tool_result", "reward_for", "run_episode", "select", "trajectory_summary", "verify_and_reward", "verify_episode",
    "visible_messages",
]
