"""Isolated, fast execution of model-written Python (issue 3).

SandboxPool runs snippets in fork servers inside bubblewrap sandboxes; ExecResult is what comes back.
Importing this package is light: the math stack is imported inside the sandbox workers, not here.
The Ray wrapper lives in mathtir.sandbox.ray_actor (imports ray; import it only where Ray is used).
"""

from mathtir.sandbox.pool import STATUSES, ExecResult, SandboxPool, SandboxUnavailable

__all__ = ["STATUSES", "ExecResult", "SandboxPool", "SandboxUnavailable"]
