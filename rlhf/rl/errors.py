"""The RL stage's user-facing error (the CLI prints it as `error: ...`, exit code 2)."""


class RLStageError(RuntimeError):
    """The RL stage cannot run as configured (bad prompts, resources, a broken reward)."""
