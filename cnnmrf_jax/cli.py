"""The command line's flags, generated from the `config.Config` fields.

Every option is declared once, as a Config field with its default and help
text (config.py); `define_flags` makes the absl flag of each (a str field
with choices is an enum flag, a tuple field a comma-separated list, a bool a
boolean), plus the two flags that are not part of a run's configuration,
--workdir and --pairs. `config_from_flags` reads parsed flags back into a
validated Config. main.py and sweep.py both go through here, so a flag
means the same in a run and in a sweep point.

`parse_argv` parses a command line the way the README promises: --help
prints the flags and exits 0; an unknown flag, a bad value or a missing
--flagfile (or one that is a directory) is one line naming it, exit 2.
"""

import dataclasses
import re
import sys
import typing
from typing import List, Optional, Sequence

from absl import flags

from cnnmrf_jax import config as config_lib

# Flags of a run that are not Config fields: where it writes and what pairs
# it solves together.
NON_CONFIG_FLAGS = ("workdir", "pairs")
EXIT_BAD_INPUT = 2


def _element_type(field: dataclasses.Field) -> type:
  return typing.get_args(_hints()[field.name])[0]


def _hints():
  return typing.get_type_hints(config_lib.Config)


def _csv(values) -> str:
  return ",".join(str(v) for v in values)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one absl flag per Config field, plus --workdir and --pairs
  (once: main.py and sweep.py both call it)."""
  if "workdir" in flag_values:
    return
  hints = _hints()
  module = __name__
  flags.DEFINE_string(
      "workdir", None, "Directory for the result, intermediates, log.jsonl "
      "and flags.txt (which reproduces the run with --flagfile).",
      flag_values=flag_values, module_name=module)
  for field in dataclasses.fields(config_lib.Config):
    kind = hints[field.name]
    help_text = field.metadata["help"]
    choices = field.metadata["choices"]
    kwargs = dict(flag_values=flag_values, module_name=module)
    if typing.get_origin(kind) is tuple:
      default = field.default
      flags.DEFINE_list(field.name, _csv(default) if default else [],
                        help_text, **kwargs)
    elif kind is bool:
      flags.DEFINE_boolean(field.name, field.default, help_text, **kwargs)
    elif kind is int:
      flags.DEFINE_integer(field.name, field.default, help_text, **kwargs)
    elif kind is float:
      flags.DEFINE_float(field.name, field.default, help_text, **kwargs)
    elif choices:
      flags.DEFINE_enum(field.name, field.default, choices, help_text,
                        **kwargs)
    else:
      flags.DEFINE_string(field.name, field.default, help_text, **kwargs)
  flags.DEFINE_string(
      "pairs", None, "A file of pairs solved together as one batch, sharded "
      "over the local devices: one 'CONTENT STYLE[,STYLE...]' per line "
      "('STYLE' in texture mode). Replaces --content_image and --style_image "
      "(flags.txt names the first pair); results are result_{n}.png.",
      flag_values=flag_values, module_name=module)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS, **changes
                      ) -> config_lib.Config:
  """The validated Config of parsed flags (changes override fields)."""
  fields = {}
  for field in dataclasses.fields(config_lib.Config):
    value = flag_values[field.name].value
    if typing.get_origin(_hints()[field.name]) is tuple:
      kind = _element_type(field)
      try:
        value = tuple(kind(v) for v in value)
      except ValueError:
        raise config_lib.ConfigError(
            f"--{field.name}: expected comma-separated {kind.__name__}s, got "
            f"{','.join(map(str, value))!r}") from None
    fields[field.name] = value
  fields.update(changes)
  return config_lib.Config(**fields).validate()


def parse_config(argv: Sequence[str], **changes) -> config_lib.Config:
  """A command line's synthesis flags (no program name) -> its Config,
  parsed into flags of its own, exactly as main.py parses them."""
  values = flags.FlagValues()
  define_flags(values)
  try:
    extra = values(["point"] + list(argv))
  except flags.Error as e:
    raise config_lib.ConfigError(_one_line(e)) from None
  if len(extra) > 1:
    raise config_lib.ConfigError(f"unexpected arguments {extra[1:]}")
  return config_from_flags(values, **changes)


def flag_names() -> List[str]:
  """Every synthesis flag: the Config fields and --workdir, --pairs."""
  return [f.name for f in dataclasses.fields(config_lib.Config)
          ] + list(NON_CONFIG_FLAGS)


# absl's message for a --flagfile it cannot open (missing, a directory, ...).
_FLAGFILE_ERROR = re.compile(
    r"Unable to open flagfile: (?:\[Errno \d+\] )?(?P<reason>.*?): "
    r"'(?P<path>.*)'$")


def _one_line(error: BaseException) -> str:
  text = str(error).replace("ERROR:: ", "").strip()
  line = " ".join(line.strip() for line in text.splitlines() if line.strip())
  flagfile = _FLAGFILE_ERROR.match(line)
  if flagfile:
    return (f"--flagfile: cannot read {flagfile['path']} "
            f"({flagfile['reason']}); expected a file of flags")
  return line


def help_text(usage: str, flag_values: flags.FlagValues = flags.FLAGS,
              modules: Sequence[str] = ()) -> str:
  """The usage text and every flag this module (and each of `modules`)
  defined, for --help."""
  sections = [flag_values.module_help(m) for m in (*modules, __name__)]
  return f"{usage.rstrip()}\n\nflags:\n" + "\n\n".join(
      s for s in sections if s)


def parse_argv(argv: Sequence[str], usage: str,
               flag_values: flags.FlagValues = flags.FLAGS,
               modules: Sequence[str] = ()) -> List[str]:
  """absl's flag parsing with the README's exit codes; for app.run's
  flags_parser. --help (-h, -?, --helpshort, --helpfull) prints the usage
  and the flags (this module's and those `modules` define) on stdout, exit
  0; a bad flag or an unreadable --flagfile is one line on stderr, exit
  2."""
  if any(a in ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull")
         for a in argv[1:]):
    print(help_text(usage, flag_values, modules))
    sys.exit(0)
  try:
    return flag_values(list(argv))
  except flags.Error as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
  """One line on stderr, then exit `code` (bad input: 2)."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def required(flag_values: flags.FlagValues, name: str,
             what: Optional[str] = None) -> str:
  """The flag's value, or one line naming it and exit 2 when unset."""
  value = flag_values[name].value
  if not value:
    fail(f"--{name} is required" + (f" ({what})" if what else ""))
  return value
