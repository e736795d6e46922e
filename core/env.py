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


def cache_root() -> Path:
    base = os.environ.get("MOEQ_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moeq"
    return Path(base)


