"""Environment runtime: sandboxed worker pool, sessions from snapshots, verifiers, MCP.

```python
from awm_core.runtime import SandboxPool
with SandboxPool(settings.sandbox) as pool:
    env = pool.load(environment)           # EnvHandle
    env.tools()                            # [ToolInfo(name, description, input_schema)]
    with env.open_session() as s:
        r = s.call("create_note", {"title": "x"})   # ToolResult(ok, content, error, error_kind)
        s.reset(); data = s.snapshot()
    pool.verify(environment, 0, initial_db=..., final_db=..., final_answer=None)  # VerifierOutcome
```
"""
from awm_core.runtime.pool import EXAMPLE_RULE, EnvHandle, SandboxPool, Session, ToolCheck
from awm_core.runtime.types import (
    EnvLoadError,
    SandboxError,
    ToolInfo,
    ToolResult,
    VerifierOutcome,
    WeakSandboxError,
)

__all__ = ["EXAMPLE_RULE", "SandboxPool", "EnvHandle", "Session", "ToolCheck", "ToolInfo", "ToolResult", "VerifierOutcome",
           "SandboxError", "EnvLoadError", "WeakSandboxError"]
