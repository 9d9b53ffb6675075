"""Errors that reach the user as one line and an exit code.

Anything raised as a :class:`MetarunError` is printed by the CLI as a single
line (no traceback unless ``--debug`` or ``HYDRA_FULL_ERROR=1``), because the
user can act on the message; every other exception is a bug and keeps its
traceback.
"""


class MetarunError(Exception):
    """A failure at run time the user can fix (exit 1)."""

    exit_code = 1


class ConfigError(MetarunError):
    """A usage or configuration error (exit 2)."""

    exit_code = 2


class DataError(MetarunError):
    """Data that is missing, corrupt or unreadable (exit 1)."""


class CheckpointError(MetarunError):
    """A checkpoint that is missing, truncated or does not match the config (exit 1)."""


# -- turning any exception into the one line a user reads ------------------------------------------
# Hydra and OmegaConf are imported inside the functions: this module is imported before either is needed.


def unknown_key(key: str, schema: type) -> ConfigError:
    """Names the keys that exist: Hydra's own advice for a misspelt key, ``+key=value``, adds a key nothing reads."""
    from dataclasses import fields

    names = ", ".join(f.name for f in fields(schema) if not f.name.startswith("_"))
    return ConfigError(f"unknown key '{key}': valid keys are {names}")


def one_line(ex: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages, folded into one line a user can act on."""
    text = str(ex).split("\nConfig search path")[0]
    key = getattr(ex, "full_key", None)
    if key and key not in text:
        text = f"{text} ({key})"
    if isinstance(ex.__cause__, Exception) and str(ex.__cause__) not in text:
        text = f"{text}: {ex.__cause__}"
    noise = ("full_key", "object_type", "reference_type", "Set the environment")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(noise)]
    head, options = [], []
    for ln in lines:
        (options if head and head[-1].startswith("Available options") else head).append(ln)
    if options:
        head[-1] = f"(valid options for {head[-1].split(chr(39))[1]}: {', '.join(options)})"
    return " ".join(head)


def is_config_error(ex: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(ex, (ConfigError, HydraException, OmegaConfBaseException)) or isinstance(
        ex.__cause__, OmegaConfBaseException
    )


def user_error(ex: BaseException | None) -> MetarunError | None:
    """The MetarunError behind ``ex`` (Hydra wraps errors raised while instantiating), if any."""
    while ex is not None:
        if isinstance(ex, MetarunError):
            return ex
        ex = ex.__cause__
    return None


def misspelt_key(ex: BaseException) -> ConfigError | None:
    """A misspelt key: Hydra advises ``+key=value``, which would add a key nothing reads; name the valid keys instead."""
    import dataclasses
    import re

    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = ex.__cause__
    match = re.match(r"Could not override '([^']+)'", str(ex))
    if (
        match is None
        or not isinstance(cause, (ConfigAttributeError, ConfigKeyError))
        or not dataclasses.is_dataclass(cause.object_type)
    ):
        return None
    typed, missing = match[1], cause.full_key
    if "." in missing or typed == missing or typed.startswith(f"{missing}."):  # `a.b=1` with no `a`: names `a`
        key = missing
    else:  # `a={b:1}`: the key is a child of the one typed
        key = f"{typed}.{missing}"
    return unknown_key(key, cause.object_type)


def unparsable_override(ex: BaseException) -> ConfigError | None:
    """An override Hydra's grammar cannot read (a non-ASCII letter or one of its special characters in an
    unquoted value): say how to quote it, instead of the lexer's internals."""
    from hydra.errors import OverrideParseException

    while ex is not None and not isinstance(ex, OverrideParseException):
        ex = ex.__cause__ or ex.__context__
    if ex is None:
        return None
    key, sep, value = ex.override.partition("=")
    if not sep:
        return ConfigError(f"cannot read the override '{ex.override}': write it as key=value")
    import re
    import shlex

    # inside Hydra's quotes a backslash is literal unless it comes before a quote or ends the string
    escaped = re.sub(r'(\\+)(?="|$)', lambda m: m.group(1) * 2, value).replace('"', '\\"')
    hydra_quoted = f'"{escaped}"'
    return ConfigError(
        f"cannot read the value of {key}={value} unquoted (Hydra's override grammar needs quotes around non-ASCII "
        f"letters and any of ()[]{{}}:=,'\"): quote the value inside the override, in bash: {shlex.quote(f'{key}={hydra_quoted}')}"
    )


def describe(ex: BaseException) -> tuple[str, int]:
    """The one line (without ``error:``) and the exit code for ``ex``: 2 usage/config, 1 run time, 130 Ctrl-C."""
    if isinstance(ex, KeyboardInterrupt):
        return "interrupted", 130
    cause = user_error(ex) or unparsable_override(ex) or misspelt_key(ex)
    if cause is not None:
        return str(cause), cause.exit_code
    if is_config_error(ex):
        return one_line(ex), 2
    return f"{type(ex).__name__}: {one_line(ex)}", 1
