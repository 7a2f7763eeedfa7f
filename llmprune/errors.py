"""The one exception type for bad user input: its message names the problem and the fix."""


class LLMPruneError(Exception):
    """A problem with the user's input or environment, shown as one line by the CLI (exit code 2)."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} — {fix}" if fix else problem)
