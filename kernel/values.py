"""## 4. Values: durations, counts, auto

How a setting written as text becomes a value: durations (`train.time_budget: 8h30m`, `train.checkpoint_interval:
20m`), whole numbers or `auto` (`train.max_steps`, `train.devices`), true, false or `auto` (`train.compile`). A value
that cannot be read is an error naming the key and what it accepts.
"""

import math
import re


DURATION_PATTERN = re.compile(r"(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m)?(?:(\d+(?:\.\d*)?)s)?")


def parse_duration(value) -> float | None:
    """Seconds from a number (64) or a string with units ("90s", "45m", "8h30m"); None means no limit."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        match = DURATION_PATTERN.fullmatch(text)
        if re.fullmatch(r"\d+(\.\d*)?", text):
            seconds = float(text)
        elif text and match and any(match.groups()):
            hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
            seconds = hours * 3600 + minutes * 60 + secs
        else:
            raise ValueError(f"{value!r} is not a duration; use seconds (64) or units like '90s', '45m', '8h30m'")
    else:
        raise ValueError(f"{value!r} is not a duration; use seconds (64) or units like '90s', '45m', '8h30m'")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{value!r} must be a positive duration (or null for no limit)")
    return seconds


def parse_steps_or_duration(value) -> int | str:
    """A whole number of steps (>= 0), kept as a number, or a duration ("90s", "20m", "1h"), kept as written so
    config.yaml still reads as a duration; `interval_seconds` turns it into seconds."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"expected a number of steps >= 0 or a duration such as '20m', got {value!r}")
        return value
    if isinstance(value, str):
        try:
            parse_duration(value)
        except ValueError:
            raise ValueError(f"expected a number of steps or a duration such as '90s', '20m', '1h', got {value!r}"
                             ) from None
        return value.strip()
    raise ValueError(f"expected a number of steps or a duration such as '20m', got {value!r}")


def interval_seconds(value: int | str) -> float | None:
    """The seconds of an interval given as a duration; None when it counts steps."""
    return None if isinstance(value, int) else parse_duration(value)


def parse_auto_or_count(value, least: int, what: str) -> int | str:
    """'auto' or a whole number >= least (given as 2 or "2")."""
    if value == "auto":
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= least:
        return value
    raise ValueError(f"expected auto or {what} >= {least}, got {value!r}")


def parse_auto_or_bool(value) -> bool | str:
    if isinstance(value, bool) or value == "auto":
        return value
    raise ValueError(f"expected true, false or auto, got {value!r}")
