"""
The configurator of every script: defaults (the globals at the top of a script) <- config files <- --key=value.

    $ python train.py config/finetune_msrvtt.py --batch_size=32 --learning_rate=3e-5

A bare argument is a config file (plain Python), `--key=value` a value read by `ast.literal_eval` (else a string); a
later argument wins. A typo of a key names its close matches, and a value must have the default's type (an int does
for a float, true/false and a bare --flag for a bool, anything for None). `--help` lists every key and its comment.
"""

import ast
import difflib
import dis
import glob
import os
import re
import sys


def _close(key: str, known, folder: str = "") -> str:
    """"; did you mean ...?" naming the entries of `known` (keys, or file names in `folder`) close to `key`."""
    matches = [os.path.join(folder, m) for m in difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)]
    return f"; did you mean {', '.join(matches)}?" if matches else ""


def _check_type(key: str, value, default, source: str):
    """`value` as the type of `default`, or a ValueError saying what was expected."""
    if default is None:  # optional settings (a path or nothing) take any value
        return value
    if isinstance(default, bool) and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    if isinstance(value, type(default)) and isinstance(value, bool) == isinstance(default, bool):  # bool is an int
        return value
    raise ValueError(f"{source}: {key} expects {type(default).__name__} (default {default!r}), "
                     f"got {type(value).__name__} {value!r}")


def describe(path: str) -> dict:
    """key -> the comment after `key = value` at the top level of a script (its defaults block), for --help."""
    with open(path, encoding="utf-8") as f:
        return {m[1]: m[2].strip() for m in re.finditer(r"^(\w+) = .*?  # (.*)$", f.read(), re.M)}


def configure(defaults: dict, argv: list[str], prog: str = "train.py", descriptions: dict | None = None,
              given: set | None = None) -> dict:
    """Config files and --key=value overrides from `argv` over a copy of `defaults` (ValueError on a bad key, type or
    file); `given` receives the keys the arguments set. -h/--help prints every key and exits 0."""
    config, given = dict(defaults), set() if given is None else given
    for arg in argv:
        if arg in ("-h", "--help"):
            width = max((len(f"--{k}={v!r}") for k, v in defaults.items()), default=0)
            print(f"usage: python {prog} [config_file.py ...] [--key=value ...]\nsettings and defaults:")
            for k, v in defaults.items():
                print((f"  --{k}={v!r}".ljust(width + 2) + f"  {(descriptions or {}).get(k, '')}").rstrip())
            sys.exit(0)
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")  # only the first '=': values may contain '=' themselves
            if key not in config:
                raise ValueError(f"command line: unknown config key {key!r}{_close(key, config)}")
            if not eq and not isinstance(defaults[key], bool):
                raise ValueError(f"command line: {arg!r} has no value; write --{key}=value")
            # strings need no quotes: anything literal_eval cannot read stays a string, and a key whose default is a
            # string keeps the raw text even when it looks like a number (--dataset=2024)
            try:
                value = ast.literal_eval(text) if eq else True  # a bare --flag switches a bool on
            except (ValueError, SyntaxError):
                value = text
            if isinstance(defaults[key], str) and not isinstance(value, str):
                value = text
            config[key] = _check_type(key, value, defaults[key], "command line")
            given.add(key)
        elif arg.startswith("-"):
            raise ValueError(f"command line: {arg!r} is neither a config file nor --key=value")
        else:
            if not os.path.isfile(arg):
                folder, name = os.path.split(arg)
                near = glob.glob("*.py", root_dir=folder or ".")
                raise ValueError(f"no config file {arg!r} (a bare argument is a config file; "
                                 f"overrides are written --key=value){_close(name, near, folder)}")
            with open(arg) as f:
                code = compile(f.read(), arg, "exec")
            # the file sees the values so far, so it can derive one from another (warmup = 0.1 * epochs); a name it
            # assigns at the top level that is not a config key is a typo unless it is private, a module or a function
            namespace = dict(config)
            exec(code, namespace)
            for key in {i.argval for i in dis.get_instructions(code) if i.opname == "STORE_NAME"}:
                value = namespace.get(key)
                if key.startswith("_") or type(value).__name__ in ("module", "function", "type"):
                    continue
                if key not in config:
                    raise ValueError(f"{arg}: unknown config key {key!r}{_close(key, config)}")
                config[key] = _check_type(key, value, defaults[key], arg)
                given.add(key)
    return config
