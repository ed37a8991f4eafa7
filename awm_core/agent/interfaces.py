"""The two ways an agent can see an environment's tools.

``direct``: every environment tool is a function tool of its own. ``meta``: the agent sees only
the AWM meta-tools ``list_tools`` (answers the tool list with schemas) and
``call_tool(tool_name, arguments)``, as the official AWM agent and MCP server do. ``arguments`` may
be an object or, as the official agent sends it, a JSON string of one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Literal

from awm_core.agent.parsing import FormatError
from awm_core.agent.episode import ToolCallRequest

Interface = Literal["direct", "meta"]
INTERFACES = ("direct", "meta")
META_TOOLS = ("list_tools", "call_tool")
# The official AWM catalogue names tools "mcp_tool_<name>"; models trained on it keep the prefix.
OFFICIAL_PREFIX = "mcp_tool_"


@dataclass(frozen=True)
class ToolDef:
    """An environment tool as the agent layer needs it (from the runtime's ``ToolInfo``)."""

    name: str
    description: str
    input_schema: dict[str, Any]

    @classmethod
    def of(cls, tool: Any) -> "ToolDef":
        if isinstance(tool, ToolDef):
            return tool
        if isinstance(tool, dict):
            return cls(tool["name"], tool.get("description", "") or "",
                       tool.get("input_schema") or tool.get("parameters") or {"type": "object", "properties": {}})
        return cls(tool.name, getattr(tool, "description", "") or "",
                   getattr(tool, "input_schema", None) or {"type": "object", "properties": {}})

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "input_schema": self.input_schema}


def function_tool(name: str, description: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """OpenAI chat-completions function tool."""
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


LIST_TOOLS = function_tool(
    "list_tools",
    "List every tool of the environment with its description and JSON schema of arguments. Call it once, first.",
    {"type": "object", "properties": {}, "required": []},
)
CALL_TOOL = function_tool(
    "call_tool",
    "Call one environment tool by name with its arguments.",
    {"type": "object",
     "properties": {
         "tool_name": {"type": "string", "description": "name of the tool, as list_tools gives it"},
         "arguments": {"type": "object", "description": "the tool's arguments as a JSON object"},
     },
     "required": ["tool_name"]},
)


class ToolRouter:
    """Maps a policy's tool call to an environment call for one interface.

    ``resolve`` raises ``FormatError`` for an unknown tool or arguments that are not an object;
    it returns ``(None, listing)`` for ``list_tools`` (answered without the environment) and
    ``(tool_name, arguments)`` for a real call.
    """

    def __init__(self, tools: Iterable[Any], interface: Interface):
        if interface not in INTERFACES:
            raise ValueError(f"interface must be one of {INTERFACES}, got {interface!r}")
        self.interface = interface
        self.env_tools = [ToolDef.of(t) for t in tools]
        self.by_name = {t.name: t for t in self.env_tools}

    def policy_tools(self) -> list[dict[str, Any]]:
        """The function tools the policy is offered."""
        if self.interface == "meta":
            return [LIST_TOOLS, CALL_TOOL]
        return [function_tool(t.name, t.description, t.input_schema) for t in self.env_tools]

    def listing(self) -> list[dict[str, Any]]:
        return [t.as_dict() for t in self.env_tools]

    def resolve(self, call: ToolCallRequest) -> tuple[str | None, dict[str, Any]]:
        if self.interface == "direct":
            if call.name not in self.by_name:
                raise FormatError("unknown_tool", f"unknown tool {call.name!r}; the tools are: "
                                                  f"{', '.join(sorted(self.by_name))}")
            return call.name, call.arguments
        if call.name == "list_tools":
            return None, {}
        if call.name != "call_tool":
            raise FormatError("unknown_tool", f"unknown tool {call.name!r}; only list_tools and call_tool "
                                              "can be called (call_tool runs an environment tool)")
        name = call.arguments.get("tool_name")
        if isinstance(name, str) and name.startswith(OFFICIAL_PREFIX) and name not in self.by_name:
            name = name[len(OFFICIAL_PREFIX):]
        if not isinstance(name, str) or name not in self.by_name:
            raise FormatError("unknown_tool", f"call_tool names an unknown tool {name!r}; list_tools gives the names")
        args = call.arguments.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as exc:
                raise FormatError("arguments_not_object",
                                  f"call_tool arguments for {name} are a string that is not JSON: {exc.msg}") from None
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise FormatError("arguments_not_object",
                              f"call_tool arguments for {name} must be a JSON object, got {type(args).__name__}")
        return name, args
