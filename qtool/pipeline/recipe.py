"""Recipes: a TOML file of ordered rules giving different tensors different settings.

    [[rule]]
    match = "*norm*"          # a glob on the tensor name, or "re:<regular expression>"
    skip = true
    [[rule]]
    match = "*.mlp.*"
    bits = 4
    granularity = "group"
    group_size = 64
    range = "mse"
    scale_dtype = "float16"   # auto (the default), float32, float16 or bfloat16
    # scale_bits = 8          # group scales as 8-bit codes x one float32 per row; 0: off

The first rule whose ``match`` fits a tensor's name decides its settings; keys a rule leaves
out come from the command line (``pipeline.decide`` applies the rules). This module only
reads and validates the file, so that every mistake is reported before any tensor is read,
naming the file, the rule number (1-based, in file order) and the key. See docs/RECIPES.md.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from pathlib import Path

from qtool.core.schemes import (
    GRANULARITIES,
    RANGE_METHODS,
    SCALE_DTYPES,
    SCHEMES,
    QuantSpec,
    SpecError,
)
from qtool.formats.safeio import read_capped
from qtool.pipeline.plan import Rule

# The settings a rule may give, with the TOML types each accepts. TOML has distinct integer,
# float and boolean types, so a quoted "4" or a `true` where a number belongs is a mistake we
# report rather than coerce (Python's bool is an int, hence the explicit bool checks below).
SETTING_KEYS: dict[str, tuple[type, ...]] = {
    "scheme": (str,),
    "bits": (int,),
    "granularity": (str,),
    "group_size": (int,),
    "range": (str,),
    "percentile": (int, float),
    "scale_dtype": (str,),
    "scale_bits": (int,),
}
RULE_KEYS = ("match", "skip", *SETTING_KEYS)
_CHOICES = {"scheme": SCHEMES, "granularity": GRANULARITIES, "range": RANGE_METHODS,
            "scale_dtype": ("auto", *SCALE_DTYPES)}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


RECIPE_SIZE_LIMIT = 1_000_000
"""Largest accepted recipe file, in bytes (real ones are a few hundred)."""


class RecipeError(SpecError):
    """A recipe file that cannot be read or holds a bad rule; the message says where."""


def _unknown_key(where: str, key: str, allowed: tuple[str, ...]) -> RecipeError:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return RecipeError(
        f"{where}: unknown key {key!r}{hint}; allowed keys: {', '.join(allowed)}"
    )


def _check_type(where: str, key: str, value: object, types: tuple[type, ...]) -> None:
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        want = " or ".join(_TYPE_NAMES[t] for t in types)
        raise RecipeError(f"{where}: {key} must be {want}, got {value!r}")


def _check_value(where: str, key: str, value: object) -> None:
    """Validate one setting on its own, so that the message names the key."""
    if key in _CHOICES and value not in _CHOICES[key]:
        raise RecipeError(
            f"{where}: {key} = {value!r} is not one of {', '.join(_CHOICES[key])}"
        )
    if key == "scale_dtype":  # "auto" is resolved per tensor, not a QuantSpec value
        return
    if key == "scale_bits":  # 8: codes x a float32 per row; 0: scales in scale_dtype
        if value not in (0, 8):
            raise RecipeError(f"{where}: scale_bits must be 8 or 0 (off), got {value!r}")
        return
    try:
        # QuantSpec holds the range checks (bits 2..8, group_size >= 1, percentile in
        # (50, 100]); a spec with only this key changed from the defaults isolates them.
        QuantSpec(**{key: value})
    except SpecError as e:
        msg = str(e)  # the key once: "group_size: group_size must be ..." said it twice
        raise RecipeError(f"{where}: {msg if msg.startswith(key) else f'{key}: {msg}'}") \
            from None


def parse_rule(raw: object, where: str) -> Rule:
    """One ``[[rule]]`` table to a Rule; ``where`` (e.g. "r.toml rule 2") prefixes errors."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: must be a table ([[rule]]), got {raw!r:.60}")
    for key in raw:
        if key not in RULE_KEYS:
            raise _unknown_key(where, key, RULE_KEYS)
    if "match" not in raw:
        raise RecipeError(f"{where}: missing key 'match' (a glob, or 're:' and a regex)")
    match = raw["match"]
    _check_type(where, "match", match, (str,))
    if match in ("", "re:"):
        raise RecipeError(f"{where}: match must not be empty")
    if match.startswith("re:"):
        try:
            re.compile(match[3:])
        except re.error as e:
            raise RecipeError(f"{where}: match {match!r} is not a valid regex ({e})") from None
    skip = raw.get("skip", False)
    _check_type(where, "skip", skip, (bool,))
    settings = {k: v for k, v in raw.items() if k in SETTING_KEYS}
    if skip and settings:
        # A skipped tensor stays in float: settings beside skip = true would be ignored,
        # which is more likely a mistake than an intent.
        raise RecipeError(
            f"{where}: skip = true cannot be combined with {', '.join(settings)}"
        )
    for key, value in settings.items():
        _check_type(where, key, value, SETTING_KEYS[key])
        _check_value(where, key, value)
    if settings:
        # Settings that contradict each other within the rule (scheme gnmt with bits 4) are
        # caught here; ones that contradict the command line are caught per tensor by decide.
        try:
            # scale_dtype and scale_bits depend on the tensor and the command line: decide()
            # checks them per tensor.
            QuantSpec(**{k: v for k, v in settings.items()  # type: ignore[arg-type]
                         if k not in ("scale_dtype", "scale_bits")})
        except SpecError as e:
            raise RecipeError(f"{where}: {e}") from None
    if "percentile" in settings:
        settings["percentile"] = float(settings["percentile"])  # type: ignore[arg-type]
    if settings.get("scale_bits") == 0:
        settings["scale_bits"] = None  # type: ignore[assignment]
    return Rule(match=match, skip=bool(skip), settings=tuple(settings.items()), origin=where)


def load_recipe(path: str | Path) -> tuple[Rule, ...]:
    """Read and validate a recipe file; the rules in file order.

    Raises RecipeError (a SpecError: exit 2 in the CLI) for a missing, unreadable or
    malformed file, an unknown key, a value of the wrong type or out of range, and a recipe
    without rules.
    """
    path = Path(path)
    # Non-blocking, regular files only and capped: `--recipe /dev/zero` or a FIFO must not
    # hang or fill memory.
    data = read_capped(path, RECIPE_SIZE_LIMIT, "recipe", error=RecipeError)
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: recipe is not UTF-8 text ({e.reason})") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML ({e})") from None
    except RecursionError:
        # tomllib recurses per level of nested arrays and inline tables.
        raise RecipeError(f"{path}: not valid TOML (nested too deeply)") from None
    for key in doc:
        if key != "rule":
            raise _unknown_key(str(path), key, ("rule",))
    raw_rules = doc.get("rule")
    if raw_rules is None:
        raise RecipeError(f"{path}: no rules; write each one as a [[rule]] table")
    if not isinstance(raw_rules, list):
        raise RecipeError(f"{path}: 'rule' must be an array of tables: write [[rule]], not [rule]")
    return tuple(parse_rule(r, f"{path} rule {i}") for i, r in enumerate(raw_rules, 1))


def _toml_str(s: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's (non-ASCII kept as UTF-8, so no
    surrogate pairs), plus DEL, which TOML wants escaped and JSON does not."""
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def dump_recipe(rules: tuple[Rule, ...] | list[Rule], header: str = "") -> str:
    """Rules as recipe TOML that :func:`load_recipe` reads back to the same rules (match,
    skip, settings in order). ``header`` lines become comments at the top."""
    lines = [f"# {h}".rstrip() for h in header.splitlines()]
    for r in rules:
        lines += ["", "[[rule]]", f"match = {_toml_str(r.match)}"]
        if r.skip:
            lines.append("skip = true")
        for key, value in r.settings:
            if isinstance(value, str):
                lines.append(f"{key} = {_toml_str(value)}")
            elif isinstance(value, float):
                lines.append(f"{key} = {value!r}")  # repr round-trips a float exactly
            else:
                lines.append(f"{key} = {int(value)}")  # type: ignore[call-overload]
    return "\n".join(lines).lstrip("\n") + "\n"


def write_recipe(path: str | Path, rules: tuple[Rule, ...] | list[Rule], header: str = "") -> None:
    """Write :func:`dump_recipe` to ``path`` atomically (a temporary file beside it, renamed
    into place), so a failure leaves no partial recipe."""
    path = Path(path)
    text = dump_recipe(rules, header)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = ["RULE_KEYS", "SETTING_KEYS", "RecipeError", "dump_recipe", "load_recipe",
           "parse_rule", "write_recipe"]
