"""Errors worded for the user: ``train.py`` shows them as one line, not as a traceback.

``DataError`` (the user's data) lives with the data modules and ``DivergenceError`` (a NaN or
Inf loss or gradient) with its callback; these two are for settings and paths.
``explain_parse_error`` turns what jsonargparse says about a command line or a config file
into one such line: the key, what is wrong, the allowed values, and a "did you mean" for a
near miss.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import inspect
import os
import re
from collections.abc import Iterable, Sequence
from glob import glob
from pathlib import Path

from src.compat import parser_actions


class ConfigError(ValueError):
    """A setting, or a combination of settings, that cannot work as given."""


class ResumeError(ConfigError):
    """A resume that would train something other than the run it continues."""


class PathNotFoundError(FileNotFoundError):
    """A model, tokenizer, adapter or checkpoint path that does not exist."""


def close_match(given: str, options: Iterable[str]) -> str | None:
    """The option nearest to ``given`` (a typo of it), if any is near enough."""
    matches = difflib.get_close_matches(given, list(options), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(given: str, options: Iterable[str]) -> str:
    """``"; did you mean X?"`` for the option nearest to ``given``, or ``""``."""
    match = close_match(given, options)
    return f"; did you mean {match}?" if match else ""


# ------------------------------------------------------------------ parse errors
# lines of jsonargparse's messages that say nothing to the user
_NOISE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes: .*|Errors:|"
    r"Expected a <class 'NoneType'>|Given value type: .*|Given value: .*)$"
)
_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)$')
_CLASS_PATH = re.compile(r"^Problem with given class_path '([^']+)':$")
_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def explain_parse_error(
    message: str, keys: Sequence[str] = (), args: Sequence[str] | None = None
) -> str:
    """One line for jsonargparse's error ``message``.

    Args:
        message: What the parser raised (several indented lines, value dumps included).
        keys: Every dotted key the (sub)command's parser accepts, for unknown keys.
        args: The command line, to find a config file that is not valid YAML.
    """
    text = message.strip()
    for explain in (_unknown_key, _subcommand, _yaml):
        found = explain(text, keys, args or [])
        if found:
            return found
    leaves, levels = _leaves(text)
    # the classes a class path must name: the first "Subtypes: [...]" line
    subtypes = re.search(r"Subtypes: \[(.*)\]", text)
    bases = [_import(n) for n in re.findall(r"<class '([\w.]+)'>", subtypes[1])] if subtypes else []
    bases = [b for b in bases if inspect.isclass(b) and b is not type(None)]
    # a class path that names nothing also reads as "not a path": keep the useful reading
    useful = [leaf for leaf in leaves if not leaf[1].startswith("Expected a path but")]
    for path, leaf in useful or leaves:
        found = _explain_leaf(path, leaf, bases) or _union(
            path, leaves, levels.get(tuple(path), {})
        )
        if found:
            return found
    parts = [leaf for _, leaf in leaves] or [text]
    line = "; ".join(dict.fromkeys(re.sub(r"\s+", " ", p) for p in parts))
    return re.sub(r"Got value: Namespace\(.*", "", line).rstrip(" .;")


KeyPath = list[tuple[str, str]]


def _leaves(text: str) -> tuple[list[tuple[KeyPath, str]], dict[tuple, dict[str, str]]]:
    """The messages of the error tree, each with the keys and classes above it, and the
    ``Subtypes`` and ``Given value`` lines of each level.

    jsonargparse nests a message under ``Parser key "k":`` and ``Problem with given
    class_path 'C':`` lines by indentation; a path is a list of ("key", k) / ("class", C).
    """
    stack: list[tuple[int, tuple[str, str] | None]] = []
    leaves = []
    levels: dict[tuple, dict[str, str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        indent = len(raw) - len(raw.lstrip())
        if line.startswith("- "):
            line, indent = line[2:], indent + 2
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [node for _, node in stack if node is not None]
        if _NOISE.match(line):
            name, _, value = line.partition(": ")
            levels.setdefault(tuple(path), {}).setdefault(name, value)
            stack.append((indent, None))
        elif match := _PARSER_KEY.match(line):
            stack.append((indent, ("key", match[1])))
            if match[2]:
                leaves.append(([*path, ("key", match[1])], match[2]))
        elif match := _CLASS_PATH.match(line):
            stack.append((indent, ("class", match[1])))
        else:
            leaves.append((path, line))
            stack.append((indent, None))
    return leaves, levels


def _union(path: KeyPath, leaves: list[tuple[KeyPath, str]], level: dict[str, str]) -> str | None:
    """A value that fits none of a key's types (``int | Literal[...] | None``...): the types
    and the allowed values, from the level's ``Subtypes`` line."""
    if "Given value" not in level or "Subtypes" not in level:
        return None
    if not all(leaf.startswith("Expected a ") for p, leaf in leaves if p == path):
        return None
    subtypes = level["Subtypes"]
    choices: list[str] = []
    for inner in re.findall(r"Literal\[([^\]]*)\]", subtypes):
        try:
            choices += [_show(c) for c in ast.literal_eval(f"[{inner}]")]
        except (ValueError, SyntaxError):
            return None
    names = re.findall(r"<class '(\w+)'>", re.sub(r"Literal\[[^\]]*\]", "", subtypes))
    kinds = [_TYPE_NAMES.get(n, n) for n in dict.fromkeys(names) if n != "NoneType"]
    if "a number" in kinds and "an integer" in kinds:
        kinds.remove("an integer")
    if choices:
        kinds.append(f"one of {', '.join(dict.fromkeys(choices))}")
    if "NoneType" in names:
        kinds.append("null")
    given = level["Given value"]
    return f"{_key(path)}: expected {' or '.join(kinds)}, got {given!r}" + (
        did_you_mean(given, choices) if choices else ""
    )


def _key(path: KeyPath, *more: str) -> str:
    """The dotted key a user writes for ``path``: a class's options sit under ``init_args``,
    a dataclass's (``lora``) directly under its key."""
    parts: list[str] = []
    for kind, value in path:
        if kind == "key":
            parts.append(value)
        elif not dataclasses.is_dataclass(_import(value)):
            parts.append("init_args")
    return ".".join([*parts, *more])


def _explain_leaf(path: KeyPath, leaf: str, bases: list[type]) -> str | None:
    classes = [value for kind, value in path if kind == "class"]
    if match := re.search(r"Option '([^']+)' is not accepted", leaf):
        inline = re.search(r"class_path='([^']+)'", leaf)  # the optimizer's own message
        owner = inline[1] if inline else (classes[-1] if classes else None)
        key = _key(path, *(["init_args"] if inline else []), match[1])
        return _unknown_option(key, match[1], owner)
    if match := re.search(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)$", leaf):
        try:
            choices = [_show(c) for c in ast.literal_eval(f"[{match[1]}]")]
        except (ValueError, SyntaxError):
            return None
        given = match[2]
        return (
            f"{_key(path)}: {given!r} is not one of {', '.join(choices)}"
            f"{did_you_mean(given, choices)}"
        )
    if match := re.search(r"Expected a <class '(\w+)'>\. Got value: (.*)$", leaf):
        wanted = _TYPE_NAMES.get(match[1], match[1])
        return f"{_key(path)}: expected {wanted}, got {match[2]!r}"
    if match := re.search(r"module '([\w.]+)' has no attribute '(\w+)'", leaf):
        key = _key(path[:-1]) if classes else _key(path)
        return _unknown_class(key, match[1], match[2], bases)
    if match := re.search(r"No module named '([\w.]+)'", leaf):
        return (
            f"{_key(path[:-1]) if classes else _key(path)}: no module {match[1]} "
            "(a class is named by its import path, e.g. src.modules.SFTModule)"
        )
    if match := re.search(r"File does not exist: '(.*)'", leaf):
        return _missing_file(_key(path), match[1])
    match = re.search(r"Unable to load config ['\"](.*)['\"]", leaf)
    if match and path and not Path(match[1]).exists():
        return _missing_file(_key(path), match[1])
    return None


def _unknown_option(key: str, name: str, owner: str | None) -> str:
    cls = _import(owner) if owner else None
    options = _options_of(cls) if cls is not None else []
    if not options:
        return f"{key}: no such option{f' of {owner}' if owner else ''}"
    line = f"{key}: no such option of {owner}{did_you_mean(name, options)}"
    if close_match(name, options) is None and cls is not None:
        for sibling in _siblings(cls):
            match = close_match(name, _options_of(sibling))
            if match:
                line += f" ({match} is an option of {_name(sibling)})"
                break
    return f"{line} (its options: {', '.join(options)})"


def _unknown_class(key: str, module_name: str, name: str, bases: list[type]) -> str:
    module = _import(module_name)
    classes = [
        n
        for n, v in (vars(module) if module is not None else {}).items()
        if inspect.isclass(v) and n[0] != "_" and (not bases or issubclass(v, tuple(bases)))
    ]
    exported = getattr(module, "__all__", None)
    if exported:
        classes = [n for n in classes if n in exported]
    line = f"{key}: no class {name} in {module_name}"
    match = close_match(name, classes)
    if match:
        line += f"; did you mean {module_name}.{match}?"
    return f"{line} ({module_name} has {', '.join(classes)})" if classes else line


def _missing_file(key: str, given: str) -> str:
    path = Path(given)
    shown = _relative(path)
    option = "--config" if key == "config" else f"--{key}"
    line = f"{option} {shown}: no such file"
    siblings = sorted(
        _relative(p) for p in path.parent.glob("*") if p.suffix in (".yaml", ".yml", ".json")
    )
    line += did_you_mean(shown, siblings)
    if siblings and not close_match(shown, siblings):
        line += f" ({_relative(path.parent)} has {', '.join(Path(s).name for s in siblings)})"
    return line


def _unknown_key(text: str, keys: Sequence[str], args: Sequence[str]) -> str | None:
    """``unrecognized arguments: --a.b 1`` (command line) or ``... does not accept option
    'a.b'`` (a config file): the first unknown part of the key, with its siblings."""
    match = re.search(r"(?:Group '([^']+)'.*)?does not accept option '([^']+)'", text)
    if match:
        given = f"{match[1]}.{match[2]}" if match[1] else match[2]
    else:
        match = re.match(r"unrecognized arguments: (.*)$", text)
        if not match:
            return None
        flags = [a for a in match[1].split() if a.startswith("--")]
        if not flags:
            return f"unexpected argument {match[1]!r} (options start with --)"
        given = flags[0][2:].split("=", 1)[0]
    parts = given.split(".")
    known = [k.split(".") for k in keys]
    depth = 0
    while depth < len(parts) and any(k[: depth + 1] == parts[: depth + 1] for k in known):
        depth += 1
    prefix = parts[:depth]
    names = list(dict.fromkeys(k[depth] for k in known if len(k) > depth and k[:depth] == prefix))
    unknown = ".".join(parts[: depth + 1])
    owner = ".".join(prefix)
    line = f"{unknown}: no such option{f' of {owner}' if owner else ''}"
    line += did_you_mean(parts[depth] if depth < len(parts) else given, names)
    if names:
        line += f" ({'its options' if owner else 'options'}: {', '.join(names)})"
    return line


def _subcommand(text: str, keys: Sequence[str], args: Sequence[str]) -> str | None:
    if match := re.fullmatch(r"argument (-\S+): expected one argument", text):
        # jsonargparse names the group (--model) of a nested key given without a value
        given = [a for a in args if a.startswith(match[1])]
        return f"{given[-1] if given else match[1]} needs a value"
    if match := re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", text):
        choices = re.findall(r"'([^']+)'", match[2])
        return (
            f"no subcommand {match[1]}{did_you_mean(match[1], choices)} "
            f"(python train.py {'|'.join(choices)} --config configs/sft.yaml)"
        )
    if match := re.search(r'expected "subcommand" to be one of \{(.*)\}', text):
        return f"no subcommand given: python train.py {match[1].replace(',', '|')} --config ..."
    return None


def _yaml(text: str, keys: Sequence[str], args: Sequence[str]) -> str | None:
    """A config file that is not valid YAML: jsonargparse does not say which one."""
    if not text.startswith("Problems parsing config"):
        return None
    import yaml

    files = [b for a, b in zip(args, args[1:], strict=False) if a.startswith("--") and b]
    for file in files:
        path = Path(file)
        if path.suffix not in (".yaml", ".yml", ".json") or not path.is_file():
            continue
        try:
            yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            return f"{file} is not valid YAML: {problem}{where}"
    return None


# --------------------------------------------------------------------- helpers
def _import(dotted: str | None) -> object:
    if not dotted:
        return None
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        try:
            return importlib.import_module(dotted)
        except ImportError:
            return None


def _name(cls: type) -> str:
    """``src.modules.DPOModule`` rather than ``src.modules.dpo.DPOModule``, where exported."""
    package = cls.__module__.rpartition(".")[0]
    if package and getattr(_import(package), cls.__name__, None) is cls:
        return f"{package}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__name__}"


def _options_of(cls: object) -> list[str]:
    """The options a config may give ``cls`` (its ``__init__`` and those it passes on)."""
    if not inspect.isclass(cls):
        return []
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    try:
        parser.add_class_arguments(cls, fail_untyped=False, sub_configs=True)
    except Exception:  # a class jsonargparse cannot read: no list rather than no message
        return []
    names = (a.dest.split(".")[0] for a in parser_actions(parser))
    return [n for n in dict.fromkeys(names) if n not in ("help", "params")]


def _siblings(cls: type) -> list[type]:
    """The other classes its package exports on the same base (``DPOModule`` for
    ``SFTModule``): an option given to the wrong objective."""
    package = _import(cls.__module__.rpartition(".")[0])
    bases = [b for b in cls.__mro__[1:] if b.__module__.startswith("src.")]
    if package is None or not bases:
        return []
    found = []
    for name in getattr(package, "__all__", []):
        value = getattr(package, name, None)
        if inspect.isclass(value) and value is not cls and issubclass(value, bases[-1]):
            found.append(value)
    return found


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _show(value: object) -> str:
    return "null" if value is None else str(value)


# ------------------------------------------------------------ models not found
def hub_not_found(name: str, what: str, key: str | None, err: BaseException) -> str:
    """Why ``name`` (neither a local path nor a hub repository that can be fetched) could
    not be loaded as ``what``, and the local directory it may be a typo of."""
    text = str(err)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline:
        reason = "the hub is off (HF_HUB_OFFLINE=1) and holds no cached copy"
    elif "not a valid model identifier" in text or "Repository Not Found" in text:
        reason = "the hub has no repository of that name (a private one needs `hf auth login`)"
    elif "gated" in text.lower():
        reason = "the hub repository is gated: accept its terms on the hub and log in"
    elif "connect" in text.lower():
        reason = "the hub cannot be reached and holds no cached copy"
    else:
        reason = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    where = f" ({key})" if key else ""
    line = f"{what} not found: {name}{where}: no such local directory, and {reason}"
    nearby = _model_dirs()
    by_name = {Path(p).name: p for p in nearby}
    match = close_match(Path(name).name, by_name) if by_name else None
    guess = by_name[match] if match else close_match(name, nearby)
    return line + (f"; did you mean {guess}?" if guess else "")


def _model_dirs() -> list[str]:
    """Directories near the working directory that hold a model or tokenizer."""
    found: list[str] = []
    for pattern in ("*", "*/*", "*/*/*", "runs/*/*/hf"):
        for path in glob(pattern):
            files = ("config.json", "tokenizer_config.json")
            if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in files):
                found.append(path)
    return list(dict.fromkeys(found))


def one_line(err: BaseException) -> str:
    """A library's message on one line."""
    return re.sub(r"\s*\n\s*", " ", str(err).strip())


__all__ = [
    "ConfigError",
    "PathNotFoundError",
    "close_match",
    "did_you_mean",
    "explain_parse_error",
    "hub_not_found",
    "one_line",
]
