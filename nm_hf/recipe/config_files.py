"""`[CONFIG.yaml|CONFIG.json] [--flag value ...]`: a config file of flag names, then flags that override it.

The config file is read strictly, because a value YAML silently turns into something else would run an
experiment nobody asked for:

- it must be UTF-8 text (the error names the file and line of the first bad byte);
- a key may appear only once (YAML and JSON parsers keep the last one without a word);
- an unquoted `N:M` such as `sparsity: 2:4` is refused: YAML 1.1 (PyYAML) reads it as the base-60
  number 124;
- every key must be a flag of the recipe (a typo gets a "did you mean" hint), and every value goes
  through the same argparse types and choices as the flag would.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import yaml

__all__ = [
    "ArgumentsError",
    "CONFIG_SUFFIXES",
    "ParsedArgs",
    "load_config_file",
    "parse_recipe_args",
    "parse_recipe_args_full",
]

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class ArgumentsError(ValueError):
    """A bad config file or flag; the message names the key/flag and the file."""


# ---------------------------------------------------------------------------------------------------------
# strict YAML

_SEXAGESIMAL_TAG = "tag:nm-hf,2025:unquoted-colon-number"
# YAML 1.1 base-60 integers and floats ("2:4" -> 124, "1:30:00" -> 5400)
_SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _ColonNumber(str):
    """An unquoted `a:b` scalar that YAML 1.1 would have read as a base-60 number."""

    line: int = 0


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(key, line)
        self.key, self.line = key, line


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and keeps unquoted `a:b` scalars recognisable."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if duplicate:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep=deep)


def _construct_colon_number(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> _ColonNumber:
    value = _ColonNumber(loader.construct_scalar(node))
    value.line = node.start_mark.line + 1
    return value


# own copy of the resolver table (the class attribute is shared with SafeLoader), with the base-60 rule first
_StrictLoader.yaml_implicit_resolvers = {
    first: list(resolvers) for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _first in "+-0123456789":
    _StrictLoader.yaml_implicit_resolvers.setdefault(_first, []).insert(0, (_SEXAGESIMAL_TAG, _SEXAGESIMAL))
_StrictLoader.add_constructor(_SEXAGESIMAL_TAG, _construct_colon_number)


def _find_colon_number(value: Any) -> _ColonNumber | None:
    if isinstance(value, _ColonNumber):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        found = _find_colon_number(item)
        if found is not None:
            return found
    return None


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key, 0)
        out[key] = value
    return out


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ArgumentsError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
                             "save the config file as UTF-8") from None
    return text.removeprefix("\ufeff")


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or JSON (.json) config file holding one mapping of flag names to values."""
    path = Path(path)
    if path.suffix not in CONFIG_SUFFIXES:
        raise ArgumentsError(f"{path}: a config file must end in {', '.join(CONFIG_SUFFIXES)}")
    if not path.is_file():
        raise ArgumentsError(f"config file not found: {path}")
    text = _read_utf8(path)
    try:
        if path.suffix == ".json":
            data = json.loads(text, object_pairs_hook=_json_pairs) if text.strip() else {}
        else:
            data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as dup:
        where = f", line {dup.line}" if dup.line else ""
        raise ArgumentsError(f"{path}{where}: key {dup.key!r} appears more than once; keep one") from None
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ArgumentsError(f"{path}: cannot parse it: {' '.join(str(err).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ArgumentsError(f"{path}: expected a mapping of flag names to values at the top level, "
                             f"got {type(data).__name__}")
    bad = [key for key in data if not isinstance(key, str)]
    if bad:
        raise ArgumentsError(f"{path}: keys must be flag names (strings), got {bad[0]!r}")
    for key, value in data.items():
        found = _find_colon_number(value)
        if found is not None:
            number = yaml.safe_load(str(found))
            raise ArgumentsError(
                f"{path}, line {found.line}: {key}: {found} is not quoted, and YAML 1.1 reads an unquoted "
                f"{found} as the base-60 number {number}; quote it: {key}: \"{found}\"")
    return data


# ---------------------------------------------------------------------------------------------------------
# config file + flags


def _suggest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _field_names(dataclass_types: Sequence[type]) -> list[str]:
    return [f.name for dtype in dataclass_types for f in dataclasses.fields(dtype) if f.init]


def _accepts_list(dataclass_types: Sequence[type]) -> set[str]:
    """Fields whose annotation allows a list although argparse takes one value (e.g. `report_to`)."""
    names: set[str] = set()
    for dtype in dataclass_types:
        for name, hint in typing.get_type_hints(dtype).items():
            args = typing.get_args(hint)
            if any(a is list or typing.get_origin(a) is list for a in args):
                names.add(name)
    return names


def _scalar(value: Any, key: str, path: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ArgumentsError(f"{path}: key {key!r} has a value of type {type(value).__name__} ({value!r}); "
                         "use a string, number, boolean or list")


def _config_tokens(config: Mapping[str, Any], actions: Mapping[str, argparse.Action], path: str,
                   list_fields: set[str]) -> tuple[list[str], dict[str, Any]]:
    """argv tokens for the config values (so argparse checks types and choices), plus direct defaults.

    Values argparse cannot express (None, an empty list, a list for a field such as `report_to` that
    takes one value on the command line but a list in Python) become parser defaults instead.
    """
    tokens: list[str] = []
    direct: dict[str, Any] = {}
    for key, value in config.items():
        action = actions[key]
        takes_list = action.nargs in ("+", "*")
        if value is None:
            direct[key] = None
        elif isinstance(value, bool) and value is False and "no" in (action.choices or ()):
            tokens.append(f"--{key}=no")  # YAML reads an unquoted `no` as false: `eval_strategy: no` means "no"
        elif isinstance(value, bool):
            tokens.append(f"--{key}={'true' if value else 'false'}")
        elif isinstance(value, (list, tuple)):
            if not takes_list:
                if key in list_fields:
                    direct[key] = [_scalar(v, key, path) for v in value]
                    continue
                raise ArgumentsError(f"{path}: key {key!r} takes a single value, got a list {list(value)!r}")
            if not value:
                direct[key] = []
            else:
                tokens += [f"--{key}", *(_scalar(v, key, path) for v in value)]
        elif isinstance(value, dict):
            tokens.append(f"--{key}={json.dumps(value)}")
        else:
            tokens.append(f"--{key}={_scalar(value, key, path)}")
    return tokens, direct


def _make_parser(dataclass_types: Sequence[type], prog: str | None, exit_on_error: bool = True,
                 description: str | None = None) -> Any:
    from transformers import HfArgumentParser  # a heavy import: only when parsing

    return HfArgumentParser(
        list(dataclass_types),
        prog=prog,
        usage=f"{prog or '%(prog)s'} [CONFIG.yaml|CONFIG.json] [--flag value ...]",
        description=description or "Flags override the values of the optional config file (its keys are "
        "flag names).",
        allow_abbrev=False,
        exit_on_error=exit_on_error,
    )


class ParsedArgs(NamedTuple):
    """The dataclass instances, the field names the user set (config file or flag) and the config file."""

    values: tuple[Any, ...]
    explicit: frozenset[str]
    config_path: str | None


def parse_recipe_args_full(
    dataclass_types: Sequence[type],
    args: Sequence[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    prog: str | None = None,
    description: str | None = None,
) -> ParsedArgs:
    """`parse_recipe_args`, also saying which fields the user set (so a recipe default can step aside)."""
    argv = list(sys.argv[1:] if args is None else args)
    config_path: str | None = None
    if argv and not argv[0].startswith("-"):
        if not argv[0].endswith(CONFIG_SUFFIXES):
            raise ArgumentsError(f"the first argument must be a config file ({', '.join(CONFIG_SUFFIXES)}) "
                                 f"or a flag, got {argv[0]!r}")
        config_path = argv.pop(0)
    names = _field_names(dataclass_types)
    if defaults:
        unknown = [key for key in defaults if key not in names]
        if unknown:
            raise ArgumentsError(f"recipe defaults name unknown field(s) {unknown}")

    parser = _make_parser(dataclass_types, prog, description=description)
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    if defaults:
        parser.set_defaults(**defaults)

    explicit: set[str] = set()
    config_tokens: list[str] = []
    if config_path is not None:
        config = load_config_file(config_path)
        unknown = [key for key in config if key not in names]
        if unknown:
            hints = "; ".join(f"{key!r}{_suggest(key, names)}" for key in unknown)
            raise ArgumentsError(f"{config_path}: unknown key(s): {hints}. Keys must be flag names of "
                                 f"{prog or 'this recipe'} (see --help)")
        explicit.update(config)
        config_tokens, direct = _config_tokens(config, actions, config_path, _accepts_list(dataclass_types))
        parser.set_defaults(**direct)
        # parse the config values alone first so a bad value is reported with the file's name
        checker = _make_parser(dataclass_types, prog, exit_on_error=False)
        if defaults:
            checker.set_defaults(**defaults)
        try:
            checker.parse_known_args(config_tokens)
        except argparse.ArgumentError as err:
            raise ArgumentsError(f"{config_path}: {err}") from None

    namespace, remaining = parser.parse_known_args(config_tokens + argv)
    if remaining:
        flags = [a for a in remaining if a.startswith("-")] or remaining
        options = [f"--{n}" for n in names]
        hints = "; ".join(f"{flag!r}{_suggest(flag.split('=')[0], options)}" for flag in flags)
        raise ArgumentsError(f"unknown or misplaced argument(s): {hints} (see --help)")
    by_option = parser._option_string_actions
    for token in argv:
        action = by_option.get(token.split("=", 1)[0]) if token.startswith("-") else None
        if action is not None:
            explicit.add(action.dest)
    outputs = []
    values = vars(namespace)
    for dtype in dataclass_types:
        keys = {f.name for f in dataclasses.fields(dtype) if f.init}
        outputs.append(dtype(**{k: v for k, v in values.items() if k in keys}))
    return ParsedArgs(tuple(outputs), frozenset(explicit), config_path)


def parse_recipe_args(
    dataclass_types: Sequence[type],
    args: Sequence[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    prog: str | None = None,
) -> tuple[Any, ...]:
    """Parse `[CONFIG.yaml|.json] [--flag value ...]` into instances of `dataclass_types`.

    Precedence, lowest first: the dataclass defaults, the recipe's `defaults`, the config file, the
    command-line flags. Config values go through the same argparse types and choices as flags. An
    unknown config key raises `ArgumentsError` naming the key and the file; an unknown flag, one
    naming the flag. `--help` prints every flag and exits.
    """
    return parse_recipe_args_full(dataclass_types, args, defaults, prog).values
