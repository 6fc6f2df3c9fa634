"""``--config_file`` / ``--output_config``: option values in a TOML file (spec cli-options §14, §15).

``parse_args_with_config(parser, argv)`` is the one entry every trainer calls instead of
``parser.parse_args()``. Behaviour as sd-scripts' ``read_config_from_file``, with deliberate changes:

(a) Precedence is command line > config file > parser default, as upstream: the file's values
    become a namespace and the command line is parsed again into it.
(b) Keys that are not options of this script follow the one rule of ``config_rules``: another
    sd-scripts script's option is a warning naming that script, a near-miss of one of this script's
    options is a ``UserError`` with "did you mean" (``unknown key 'learning_rat' in x.toml; did you mean
    'learning_rate'?``), anything else (front-ends' bookkeeping keys) is ignored with one warning
    listing the keys. Upstream keeps every unknown key as a silent extra attribute, so a typo is ignored.
(c) Values are checked and converted with the option's own ``type``, ``choices`` and ``nargs``,
    like a command-line value: a TOML string ``"1e-4"`` for a float option becomes ``0.0001``,
    an int for a float option becomes a float; a wrong type or a value outside ``choices`` is a
    ``UserError`` naming key and file. What upstream's unchecked config path accepts with a clear meaning
    is accepted with that meaning (``config_rules``): ``0``/``1`` for flags, ``""`` for an unset optional
    value, ``8.0`` for an integer, ``max_token_length = 75``, ``dynamo_backend = "no"``. List options
    (``nargs``) take arrays; a scalar is wrapped into a one-element list. ``resolution`` and
    ``face_crop_aug_range`` may be written as numbers or arrays (``512``, ``[768, 512]``) and are
    turned into the strings the command line would give. Upstream converts nothing.
(d) ``--output_config`` without ``--config_file`` is an error (upstream silently ignores it and
    starts training). An existing target is refused (exit code 2 instead of upstream's 1, nothing
    written). Besides ``wandb_api_key`` (as upstream) ``huggingface_token`` is never written either:
    both are secrets that must not leak into a file meant to be shared.
(e) A missing config file is a ``UserError`` (exit 2; upstream logs and exits 1).
(f) The secret check (§15) runs whenever a secret (``--wandb_api_key``, ``--huggingface_token``) is
    on the command line, since shell history and process lists expose it too, and whenever the
    effective ``log_with`` (file included) is ``wandb``/``all``; upstream looks only at
    ``--log_with`` on the raw command line.

Unchanged from upstream: ``.toml`` is appended when the name does not end with it; top-level tables
are flattened (section names are free, later sections win on duplicate keys, deeper tables stay
values); after loading, ``args.config_file`` is the path without its extension.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, NoReturn, Sequence

import toml

from library.config.config_rules import CONFIG_ONLY_VALUES, classify_keys
from library.errors import UserError
from library.fileio import write_text_atomic

logger = logging.getLogger(__name__)

SECRET_KEYS = ("wandb_api_key", "huggingface_token")
# these steer the config machinery itself; inside a file they would mean nothing
_NOT_IN_FILE = ("config_file", "output_config")
# options that the dataset code parses from "a,b" strings (spec cli-options §3)
_COMMA_STRING_OPTIONS = ("resolution", "face_crop_aug_range")
_PATH_OPTIONS = (
    "pretrained_model_name_or_path", "vae", "tokenizer_cache_dir", "train_data_dir", "conditioning_data_dir",
    "reg_data_dir", "output_dir", "logging_dir",
)
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", Path: "a path string"}


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
                           script: str | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) merged with ``--config_file``; handle ``--output_config``.

    ``script`` (default: the parser's ``prog`` without ``.py``) decides which keys belong to another script.
    Spec cli-options §14 with the changes listed in this module's docstring.
    """
    cli = parser.parse_args(argv)
    return merge_config_file(parser, cli, argv, script)


def merge_config_file(parser: argparse.ArgumentParser, cli: argparse.Namespace, argv: Sequence[str] | None,
                      script: str | None = None) -> argparse.Namespace:
    """The part of ``parse_args_with_config`` after the first parse (also what ``read_config_from_file`` does)."""
    if getattr(cli, "output_config", False):
        verify_command_line_training_args(cli)
        write_config_from_args(parser, cli)
    if not getattr(cli, "config_file", None):
        verify_command_line_training_args(cli)
        return cli
    path = resolve_config_path(cli.config_file)
    values = load_config_values(parser, path, script)
    args = parser.parse_args(argv, namespace=argparse.Namespace(**values))
    args.config_file = os.path.splitext(path)[0]  # upstream stores the name without extension
    logger.info("loaded options from %s", path)
    verify_command_line_training_args(cli, log_with=getattr(args, "log_with", None))
    return args


def resolve_config_path(config_file: str) -> str:
    """``.toml`` appended when missing, as upstream (a case-sensitive check)."""
    return config_file if config_file.endswith(".toml") else config_file + ".toml"


def load_config_values(parser: argparse.ArgumentParser, path: str, script: str | None = None) -> dict[str, Any]:
    """Read, flatten and check a ``--config_file`` TOML; return ``{dest: converted value}``.

    Keys that are not options of the script are sorted by ``config_rules.classify_keys``: typos raise,
    the others are dropped with a warning.
    """
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = toml.load(f)
    except (toml.TomlDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a valid UTF-8 TOML file: {e}") from None
    actions = _actions_by_dest(parser)
    flat = flatten_sections(data)
    for key in _NOT_IN_FILE:
        if key in flat:
            logger.warning("key '%s' in %s is ignored: it only has a meaning on the command line", key, path)
            del flat[key]
    own = [d for d in actions if d not in _NOT_IN_FILE]
    drop_foreign_keys(flat, own, script or script_of(parser), path)
    return {key: _check_value(actions, key, value, path) for key, value in flat.items()}


def script_of(parser: argparse.ArgumentParser) -> str:
    prog = parser.prog or ""
    return prog[:-3] if prog.endswith(".py") else prog


def drop_foreign_keys(values: dict[str, Any], own: list[str], script: str, where: str) -> None:
    """Apply the key rule of ``config_rules`` to ``values`` in place: raise on a typo, drop the rest with
    warnings. ``where`` names the file (or object) the keys came from."""
    verdicts = classify_keys(list(values), script, own)
    if verdicts.typos:
        key, close = verdicts.typos[0]
        more = f" (and {len(verdicts.typos) - 1} more such key(s): " \
               f"{', '.join(k for k, _ in verdicts.typos[1:])})" if len(verdicts.typos) > 1 else ""
        raise UserError(f"unknown key '{key}' in {where}; did you mean '{close}'?{more}")
    for key, scripts in verdicts.other_script:
        logger.warning("key '%s' in %s is an option of %s, not of %s.py: ignored", key, where,
                       " / ".join(f"{s}.py" for s in scripts[:3]) + (" ..." if len(scripts) > 3 else ""), script)
        del values[key]
    if verdicts.unknown:
        logger.warning("%s: ignored %d key(s) that are options of no sd-scripts script (front-end settings?): %s",
                       where, len(verdicts.unknown), ", ".join(verdicts.unknown))
        for key in verdicts.unknown:
            del values[key]


def flatten_sections(data: dict[str, Any]) -> dict[str, Any]:
    """Top-level tables are merged into one flat dict (later ones win); other values are kept as is."""
    flat: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, dict):
            flat.update(value)  # a table two levels deep stays a value, as upstream
        else:
            flat[name] = value
    return flat


def write_config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> NoReturn:
    """``--output_config``: write the non-default options of ``args`` to the config file, exit 0."""
    if not getattr(args, "config_file", None):
        raise UserError("--output_config needs --config_file: the TOML file to write the options to")
    path = resolve_config_path(args.config_file)
    if os.path.exists(path):
        raise UserError(f"--output_config: {path} already exists; remove it or choose another --config_file "
                        "(nothing was written)")
    defaults = vars(parser.parse_args([]))
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key in _NOT_IN_FILE or value is None:  # TOML has no null; None is every None-default anyway
            continue
        if key in SECRET_KEYS:
            logger.warning("--%s is not written to %s: secrets stay out of shareable config files", key, path)
            continue
        if key in defaults and value == defaults[key]:
            continue
        out[key] = str(value) if isinstance(value, Path) else value
    write_text_atomic(path, toml.dumps(out))
    logger.info("wrote %d option(s) to %s", len(out), path)
    raise SystemExit(0)


def verify_command_line_training_args(cli_args: argparse.Namespace, log_with: str | None = None) -> None:
    """Warn about secrets and private paths on the command line (spec cli-options §15).

    ``cli_args`` must be the command line alone (before the config file is merged): values from the
    file are not exposed. Runs when a secret is on the command line or when logging to wandb.
    """
    log_with = log_with if log_with is not None else getattr(cli_args, "log_with", None)
    secrets = [key for key in SECRET_KEYS if getattr(cli_args, key, None) is not None]
    if not secrets and log_with not in ("wandb", "all"):
        return
    for key in secrets:
        logger.warning("--%s is given on the command line, where shell history, process lists and wandb "
                       "(which records the command line) can expose it; put it in the --config_file TOML instead",
                       key)
    for key in _PATH_OPTIONS:
        value = getattr(cli_args, key, None)
        if value is not None and os.path.isabs(str(value)):
            logger.info("--%s is an absolute path (%s) on the command line, which wandb records; "
                        "a relative path or the --config_file TOML keeps it private", key, value)
    if getattr(cli_args, "config_file", None):
        logger.info("--config_file is on the command line, so its path is recorded by wandb")
    if getattr(cli_args, "huggingface_repo_id", None) and getattr(cli_args, "huggingface_repo_visibility", None) != "public":
        logger.info("--huggingface_repo_id is on the command line while the repository is not public; "
                    "its name is recorded by wandb")


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        a.dest: a for a in parser._actions
        if a.dest != argparse.SUPPRESS and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))
    }


def _check_value(actions: dict[str, argparse.Action], key: str, value: Any, path: str) -> Any:
    """Check one file value against its option like argparse checks a command-line value, plus the value
    rules of ``config_rules`` (what upstream's unchecked config path accepts with a clear meaning)."""
    action = actions[key]
    equivalents = CONFIG_ONLY_VALUES.get(key, {})
    if _hashable(value) and value in equivalents and not isinstance(value, bool):
        return equivalents[value]
    if isinstance(action, argparse._StoreConstAction):  # store_true / store_false / store_const
        if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
            value = bool(value)  # upstream tests truthiness; GUIs write 0/1 for a ticked box
        if not isinstance(value, bool):
            raise UserError(f"'{key}' in {path} is a flag: write true or false (or 1 / 0), not {value!r}")
        return value
    if value == "" and action.default is None:
        return None  # upstream: an empty string is falsy, i.e. "not given"
    if isinstance(action, argparse._CountAction):
        return _convert_scalar(action, key, value, path, int)
    nargs = action.nargs
    if nargs in ("*", "+") or isinstance(nargs, int):
        items = value if isinstance(value, list) else [value]  # a scalar is a one-element list
        if nargs == "+" and not items:
            raise UserError(f"'{key}' in {path} needs at least one value")
        if isinstance(nargs, int) and len(items) != nargs:
            raise UserError(f"'{key}' in {path} needs exactly {nargs} value(s), got {len(items)}")
        return [_convert_scalar(action, key, item, path, action.type or str) for item in items]
    if key in _COMMA_STRING_OPTIONS:
        value = _comma_string(key, value, path)
    return _convert_scalar(action, key, value, path, action.type or str)


def _hashable(value: Any) -> bool:
    return not isinstance(value, (list, dict))


def _comma_string(key: str, value: Any, path: str) -> Any:
    """``512`` / ``[768, 512]`` → ``"512"`` / ``"768,512"``, the form the command line gives."""
    def is_number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if is_number(value):
        return str(value)
    if isinstance(value, list):
        if not value or not all(is_number(v) for v in value):
            raise UserError(f"'{key}' in {path} must be a number, \"a,b\" or an array of numbers, got {value!r}")
        return ",".join(str(v) for v in value)
    return value


def _convert_scalar(action: argparse.Action, key: str, value: Any, path: str, typ: Any) -> Any:
    expected = _TYPE_NAMES.get(typ, getattr(typ, "__name__", str(typ)))
    if isinstance(value, str):
        try:
            out = typ(value)  # the same conversion argparse applies to command-line text
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            raise UserError(f"'{key}' in {path} must be {expected}, got {value!r}") from None
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"'{key}' in {path} must be {expected}, got {value!r}")
    elif typ is float:
        out = float(value)
    elif typ is int and isinstance(value, int):
        out = value
    elif typ is int and isinstance(value, float) and value.is_integer():
        out = int(value)  # 8.0 means 8 (what upstream's arithmetic does with it)
    else:
        raise UserError(f"'{key}' in {path} must be {expected}, got {value!r}")
    if action.choices is not None and out not in action.choices:
        choices = ", ".join(repr(c) for c in action.choices if c is not None)
        raise UserError(f"'{key}' in {path}: invalid choice {out!r} (choose from {choices})")
    return out
