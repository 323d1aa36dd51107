# Reads the options of Django management commands from Django itself, for
# portcullis. Run as: python -c <this> <manage.py> <"*" | command...>
# Runs manage.py as `python manage.py` would (its sys.path, its settings
# module), but with execute_from_command_line replaced by the reader below,
# so no command runs. Prints one marker line followed by JSON to stdout.
import argparse
import json
import os
import runpy
import sys

MARK = "@@portcullis-introspection@@"
real_stdout = sys.stdout
sys.stdout = sys.stderr


def plain(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)) and all(
        x is None or isinstance(x, (bool, int, float, str)) for x in v
    ):
        return list(v)
    return str(v)


ACTIONS = {
    argparse._StoreAction: "store",
    argparse._StoreConstAction: "store_const",
    argparse._StoreTrueAction: "store_true",
    argparse._StoreFalseAction: "store_false",
    argparse._AppendAction: "append",
    argparse._AppendConstAction: "append_const",
    argparse._CountAction: "count",
    argparse._HelpAction: "help",
    argparse._VersionAction: "version",
    argparse._SubParsersAction: "subparsers",
}
if hasattr(argparse, "_ExtendAction"):
    ACTIONS[argparse._ExtendAction] = "extend"
if hasattr(argparse, "BooleanOptionalAction"):
    ACTIONS[argparse.BooleanOptionalAction] = "boolean_optional"


def action_kind(a):
    for cls in type(a).__mro__:
        if cls in ACTIONS:
            return ACTIONS[cls]
    return "other"


def describe(name, app):
    from django.core.management import load_command_class
    from django.core.management.base import BaseCommand

    cmd = app if isinstance(app, BaseCommand) else load_command_class(app, name)
    parser = cmd.create_parser(os.path.basename(sys.argv[0]), name)
    fmt = parser._get_formatter()
    actions = []
    for a in parser._actions:
        try:
            help_text = None if a.help in (None, argparse.SUPPRESS) else fmt._expand_help(a)
        except Exception:
            help_text = a.help if isinstance(a.help, str) else None
        try:
            usage = fmt._format_args(a, a.dest) if not a.option_strings else None
        except Exception:
            usage = a.dest
        nargs = a.nargs
        if nargs is not None and not isinstance(nargs, (int, str)):
            nargs = str(nargs)
        default = a.default
        if default is argparse.SUPPRESS:
            default = None
        actions.append(
            {
                "option_strings": list(a.option_strings),
                "dest": a.dest,
                "action": action_kind(a),
                "nargs": nargs,
                "type": getattr(a.type, "__name__", None) if a.type is not None else None,
                "choices": None if a.choices is None else [plain(c) for c in a.choices],
                "help": help_text,
                "default": plain(default),
                "usage": usage,
            }
        )
    text = parser.description or getattr(cmd, "help", None) or None
    return {"ok": True, "help": str(text).strip() if text else None, "actions": actions}


def introspect(argv=None):
    import django
    from django.conf import settings
    from django.core.management import get_commands

    settings.INSTALLED_APPS  # raises if the settings cannot be loaded
    django.setup()
    commands = get_commands()
    wanted = WANTED
    if wanted == ["*"]:
        wanted = sorted(commands)
    out = {}
    for name in wanted:
        if name not in commands:
            out[name] = {
                "ok": False,
                "error_type": "unknown",
                "error": "Django has no command named %r" % name,
            }
            continue
        try:
            out[name] = describe(name, commands[name])
        except BaseException as e:  # a broken command must not hide the others
            out[name] = {
                "ok": False,
                "error_type": type(e).__name__,
                "error": "%s: %s" % (type(e).__name__, e),
            }
    real_stdout.write("\n" + MARK + json.dumps({"commands": out}) + "\n")
    real_stdout.flush()
    sys.exit(0)


manage_py = os.path.abspath(sys.argv[1])
WANTED = sys.argv[2:]
sys.argv = [manage_py]
sys.path[0] = os.path.dirname(manage_py)
import django.core.management

django.core.management.execute_from_command_line = introspect
runpy.run_path(manage_py, run_name="__main__")
sys.stderr.write("manage.py returned without calling execute_from_command_line\n")
sys.exit(2)
