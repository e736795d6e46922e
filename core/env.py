"""moeq's own environment variables: only MOEQ_-prefixed ones, parsed strictly."""
import os
from pathlib import Path

from moeq.errors import UserError

TRUE, FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def env_default(name: str, default=None):
    """A flag's default from MOEQ_<name>; moeq reads no other environment variables of its own."""
    return os.environ.get(f"MOEQ_{name}") or default


def env_flag(name: str) -> bool:
    """MOEQ_<name> as a yes/no value, strictly: MOEQ_FORCE=0 is false, MOEQ_FORCE=maybe an error."""
    value = os.environ.get(f"MOEQ_{name}", "").strip().lower()
    if value not in TRUE + FALSE:
        raise UserError(f"MOEQ_{name}={os.environ[f'MOEQ_{name}']!r} is not a yes/no value; "
                        f"valid: {', '.join(TRUE)} or {', '.join(FALSE[1:])}")
    return value in TRUE


def env_number(name: str, default: float, low: float = 0, kind=float):
    """MOEQ_<name> as a number >= low, strictly: an invalid one names itself and the valid range."""
    text = os.environ.get(f"MOEQ_{name}", "").strip()
    if not text:
        return kind(default)
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise UserError(f"MOEQ_{name}={text!r} is not valid; valid: a {'whole ' if kind is int else ''}number >= {low}")
    return value


def cache_root() -> Path:
    base = os.environ.get("MOEQ_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moeq"
    return Path(base)


