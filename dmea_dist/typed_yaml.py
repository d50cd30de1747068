"""YAML into typed dataclasses, strictly: what `dmea_dist.config` builds a run's configuration with.

* `parse_yaml` / `dump_yaml`: YAML with YAML 1.2's numbers. PyYAML follows YAML 1.1, where `1e-4`, `5e-5` and
  `1e6` (no dot, or no exponent sign) are strings: our typed fields could convert them where they are used,
  but an untyped section (`deepspeed:`) passed such a string to DeepSpeed's optimizer, which failed at the first
  adaptation. They are read as floats, for a whole file and for `--set` values alike; a number written in
  quotes stays a string. A key given twice, YAML 1.1's octal and base 60 integers are refused.
* `build`: a frozen dataclass from a mapping: an unknown key fails with its dotted name and the closest valid
  key, a wrong type with the expected type; nested dataclasses, lists, Literals and Optionals are followed.
* `apply_override`: `--set a.b.c=value`, its key checked against the dataclass's fields before the file's.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal

import yaml

from dmea_dist.errors import ConfigError

# YAML 1.2 floats with an exponent that YAML 1.1 (PyYAML) leaves as strings: 1e-4, 5e-5, 1e6, 1.0e4, .5e3
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class _YamlLoader(yaml.SafeLoader):
    """yaml.safe_load with YAML 1.2's exponent floats (module docstring), refusing a key given twice."""

    def construct_mapping(self, node, deep=False):
        # PyYAML keeps the last of two equal keys silently: a config with `train:` twice would lose the first
        # section's keys, `lr:` twice the first value. A merge key (`<<: *base`) may still be overridden.
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping (first on line {first.start_mark.line + 1}); "
                    f"YAML would keep only the last one: write it once", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        # YAML 1.1 reads a leading zero as octal (`seed: 010` is 8) and colons as base 60 (`1:30` is 90); YAML 1.2,
        # and a reader of the file, would not: refused rather than read as a number nobody wrote
        value = super().construct_yaml_int(node)
        text = str(node.value).replace("_", "")
        if re.fullmatch(r"[-+]?0[0-7]+", text) or ":" in text:
            kind, drop = ("a base 60", "colons") if ":" in text else ("an octal", "its leading zero")
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value} is {kind} number to YAML 1.1 ({value}): write the number without {drop}, "
                f"or quote it for text", node.start_mark)
        return value


_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))
_YamlLoader.add_constructor("tag:yaml.org,2002:int", _YamlLoader.construct_yaml_int)


def parse_yaml(text: str) -> Any:
    """Parse config YAML (a file or a `--set` value) with YAML 1.2 numbers."""
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader: plain data only, never objects


class _YamlDumper(yaml.SafeDumper):
    """yaml.safe_dump that quotes the strings `parse_yaml` would read as exponent floats (a run named 1e5)."""


_YamlDumper.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


def dump_yaml(data: Any) -> str:
    """YAML that `parse_yaml` reads back as `data` (a run's config.yaml, which `dmea resume` loads)."""
    return yaml.dump(data, Dumper=_YamlDumper, sort_keys=False)


def apply_override(raw: dict[str, Any], item: str, *, root: type, source: str = "") -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`3`, `true`, `[a, b]`), the key checked
    against the fields of dataclass `root` (`check_override_key`). `source`: the file the override applies to,
    named in errors."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. train.lr=1e-4)")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    _check_override_key(parts, root=root, item=item, source=source)
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or a section written empty (`deepspeed:` with its keys commented out)
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    try:
        value = parse_yaml(text)
        if "#" in text and value != _restore_hash(parse_yaml(text.replace("#", _HASH))):
            # YAML reads ` #...` as a comment: `--set name=run #2` would silently name the run `run`
            raise ConfigError(f"override {item!r}: YAML reads the ' #' and what follows as a comment; quote the "
                              f"value to keep it (e.g. {key}='{text.strip()}')")
        lost = _lost_keys(node.get(parts[-1]), value, prefix=key.strip())
        if lost:  # `--set train={lr: 1e-3}` replaced the section: the file's train.batch_size went back to its default
            where = f"{source}: " if source else ""
            raise ConfigError(f"{where}--set {item} would replace the whole section, dropping {', '.join(lost)} "
                              f"that the config sets; set the keys one at a time (--set {key.strip()}.KEY=VALUE)")
        node[parts[-1]] = value
    except yaml.YAMLError as err:  # one line: the parser's problem and where, not its multi-line excerpt
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        mark = getattr(err, "problem_mark", None)
        where = f" at character {mark.column + 1} of the value" if mark is not None else ""
        raise ConfigError(f"override {item!r}: value is not valid YAML: {problem}{where} (lists: [a, b]; quote a "
                          f"string that holds YAML's characters)") from err


def _lost_keys(old: Any, new: Any, *, prefix: str) -> list[str]:
    """The dotted keys of mapping `old` that mapping `new` would drop if it replaced it (none unless both are)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return []
    return [lost for k, v in old.items()
            for lost in ([f"{prefix}.{k}"] if k not in new else _lost_keys(v, new[k], prefix=f"{prefix}.{k}"))]


_HASH = "\ue000"  # a private-use character standing in for '#': the value as YAML reads it without comments


def _restore_hash(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace(_HASH, "#")
    if isinstance(value, list):
        return [_restore_hash(v) for v in value]
    if isinstance(value, dict):
        return {_restore_hash(k): _restore_hash(v) for k, v in value.items()}
    return value


def _check_override_key(parts: list[str], *, root: type, item: str, source: str) -> None:
    """An override's key must name a field: a typo fails naming the override, not the config file it is not in."""
    cls: Any = root
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):  # a free-form section (deepspeed, data.user_tasks): its owner's keys
            return
        fields = {f.name for f in dataclasses.fields(cls)}
        where = f"{source}: " if source else ""
        prefix = "".join(f"{p}." for p in parts[:depth])
        name = part.split("[", 1)[0]
        if part not in fields and name in fields and typing.get_origin(typing.get_type_hints(cls)[name]) is list:
            # `candidates[0].beta=0.3` or `candidates.0.beta=0.3`: a list is set whole
            raise ConfigError(f"{where}--set {item}: {prefix}{name} is a list, set as a whole "
                              f"(e.g. --set '{prefix}{name}=[...]'), not item by item")
        if part not in fields:
            raise ConfigError(f"{where}--set {item}: {_unknown_key(part, fields, prefix=prefix)}")
        cls = typing.get_type_hints(cls)[part]
        if typing.get_origin(cls) is list and depth < len(parts) - 1:
            raise ConfigError(f"{where}--set {item}: {prefix}{part} is a list, set as a whole "
                              f"(e.g. --set '{prefix}{part}=[...]'), not item by item")


def _unknown_key(key: str, fields, *, prefix: str) -> str:
    """"unknown key 'a.b'; did you mean 'a.c'? (accepted under a: ...)", for a file's key or an override's."""
    close = difflib.get_close_matches(key, fields, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    return (f"unknown key '{prefix}{key}'{hint} (accepted under {prefix.rstrip('.') or 'top level'}: "
            f"{', '.join(sorted(fields))})")


def build(cls: type, raw: Any, *, prefix: str, source: str):
    """Dataclass `cls` from a raw mapping: unknown keys named with the closest valid one, values coerced to the
    fields' types (`_coerce`), required keys present; `prefix`: the dotted key of `raw`, `source`: its file."""
    if raw is None:  # a section written empty (`model:` with every key commented out): its defaults
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'top level'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ConfigError(f"{source}: {_unknown_key(str(unknown[0]), fields, prefix=prefix)}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, key=f"{prefix}{name}", source=source)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: missing required key {prefix}{missing[0]}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


_BOOL_WORDS = {False: ("off", "no", "false", "n"), True: ("on", "yes", "true", "y")}


def _coerce(tp: Any, value: Any, *, key: str, source: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=f"{key}.", source=source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key=key, source=source)
    if origin is Literal:
        if isinstance(value, bool) and value not in args:  # YAML 1.1 reads a bare off/on/no/yes as a bool
            spelled = [a for a in args if isinstance(a, str) and a.lower() in _BOOL_WORDS[value]]
            if len(spelled) == 1:
                return spelled[0]
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: {key}={value!r} is not accepted{hint}; choose one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(args[0], v, key=f"{key}[{i}]", source=source) for i, v in enumerate(value)]
    if origin is dict:
        if value is None:  # written empty, as a section (`deepspeed:`, `user_tasks:`)
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return {str(k): v for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # a quoted number, or a dict built without parse_yaml
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, float) and value.is_integer():  # steps: 1e4 (YAML 1.2 reads a float)
        return int(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {key} must be {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value
