"""lumina/config.py: how every LuminaAI script is configured. It imports nothing heavy (no torch), so
Dataset_download.py and any script's --help run where torch is absent.

A script declares one commented `CONFIG = {...}` dict after its imports; the dict is the
documentation. On the command line:
  --key=value or --key value   override a key ('3e-4', 'true', 'none', "['en','de']" are read as Python)
  --key                        for a key whose default is True/False: set it to True
  --help                       print the script's docstring and its CONFIG block, comments and all
  PATH                         a positional argument, for scripts that take one (a checkpoint)
An unknown key, a value of the wrong type, or one outside its range is refused with a one-line
message that names the valid keys or the allowed values, and the script exits with code 2.
"""
import ast
import sys


class ConfigError(Exception):
    """A bad command-line argument; the message names the valid keys, types or values."""


# The sampling a chat stage starts from: ChatAI.py's CONFIG, serve.py's CONFIG (and through it its
# page) take these, so a reply reads the same in the terminal and in the browser.
CHAT_SAMPLING = {"temperature": 0.8, "top_k": 40, "repetition_penalty": 1.0, "max_new_chars": 400}


def parse_value(text):
    """'3e-4' -> 3e-4, 'true' -> True, 'none' -> None, "['en','de']" -> list; else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false", "none", "null"):
        return {"true": True, "false": False}.get(lowered)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def typed(key, text, default, want):
    """The value of --key=text, checked against the type `want` (or the default's type)."""
    value = parse_value(text)
    want = want or (type(default) if default is not None else None)
    if want is float and type(value) is int:
        value = float(value)
    if want is list and isinstance(value, str):
        value = [word.strip() for word in value.split(",")]  # --languages=en,de
    elif want is list and isinstance(value, (int, float, tuple)):
        value = list(value) if isinstance(value, tuple) else [value]  # --folds=0 or --folds=0,1
    if want is str and value is not None and not isinstance(value, str):
        value = text  # a prompt such as "42" stays the text the user typed
    if want is not None and value is not None and type(value) is not want:
        raise ConfigError(f"--{key} expects {want.__name__}, got {text!r}")
    return value


def apply_overrides(config, args, types=None, renamed=None):
    """A copy of `config` with --key=value / --key value / --flag args applied. `types` gives the type
    of keys whose default is None; `renamed` maps an old key name to the message that replaces it."""
    config, types, renamed, args = dict(config), types or {}, renamed or {}, list(args)
    while args:
        arg = args.pop(0)
        key, sep, text = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if key in renamed:
            raise ConfigError(f"--{key} was renamed: {renamed[key]}")
        if key not in config:
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(config)}"
                              if key else f"cannot read {arg!r}: write overrides as --key=value")
        if not sep and isinstance(config[key], bool):
            text = "true"  # a bare --force means --force=true
        elif not sep:
            if not args:
                raise ConfigError(f"--{key} needs a value: write --{key}=VALUE")
            text = args.pop(0)
        config[key] = typed(key, text, config[key], types.get(key))
    return config


def check_rules(config, rules):
    """rules: key -> (low, high) for a number, or a tuple of lower-case strings for a choice, which
    any case matches (--compile=True is "true"; so is a run's saved True). None passes (it means
    'use the default rule' wherever a key allows it)."""
    for key, rule in rules.items():
        value = config.get(key)
        if value is None:
            continue
        if all(isinstance(r, str) for r in rule):
            if str(value).lower() not in rule:
                raise ConfigError(f"{key} must be one of {', '.join(rule)}, got {value!r}")
            config[key] = str(value).lower()
        elif not rule[0] <= value <= rule[1]:
            raise ConfigError(f"{key} must be between {rule[0]} and {rule[1]}, got {value}")
    return config


def script_help(path):
    """The script's docstring and its CONFIG block, comments and all."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("CONFIG = {"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("}"))
    doc = ast.get_docstring(ast.parse(source)) or ""
    return doc + "\n\nEvery key can be set with --key=value:\n\n" + "\n".join(lines[start:end + 1])


def parse_cli(argv, config, script_path, types=None, rules=None, flags=(), renamed=None, positional=0):
    """(config, flags, positional args) from argv. `flags` are words such as 'resume' that are not
    config keys; `positional` is how many bare arguments (e.g. a checkpoint path) the script takes.
    --help prints the script's help and exits 0; a bad argument exits 2 with a one-line message."""
    if "--help" in argv or "-h" in argv:
        print(script_help(script_path))
        sys.exit(0)
    chosen = {flag: "--" + flag in argv for flag in flags}
    rest = [a for a in argv if a[2:] not in flags or not a.startswith("--")]
    paths, overrides = [], []
    while rest:
        arg = rest.pop(0)
        if not arg.startswith("-"):
            paths.append(arg)
            continue
        overrides.append(arg)
        if "=" not in arg and not isinstance(config.get(arg[2:]), bool) and rest:
            overrides.append(rest.pop(0))  # --key value: the next word is the value, even "-1"
    try:
        if len(paths) > positional:
            raise ConfigError(f"unexpected argument {paths[positional]!r}" + (
                f"; give at most {positional} path" if positional else "; write options as --key=value"))
        return check_rules(apply_overrides(config, overrides, types, renamed), rules or {}), chosen, paths
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

