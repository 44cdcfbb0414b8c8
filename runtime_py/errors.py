"""The one exception type whose message the CLI prints as a single line and exits non-zero on."""


class UserError(Exception):
    """Bad input or a missing dependency: the message says what and, where possible, how to fix it."""


class MissingDependencyError(UserError):
    """An optional backend is not installed; the message names the extra to install."""

    def __init__(self, module: str, extra: str, purpose: str = ""):
        what = f" ({purpose})" if purpose else ""
        super().__init__(f"{module} is not installed{what}: pip install 'gmcnn-mobile[{extra}]'")
        self.module = module
        self.extra = extra
