"""Typed configuration: the schema with a rule beside each field (`schema`, `rules`),
`--section.field=value` overrides (`overrides`) and the values derived from a config and a launch
(`derived`). The names most callers need, from one place:

    from scale.config import Config, apply_overrides, derive
"""

from scale.config.derived import Derived, default_run_name, derive, split_batch
from scale.config.overrides import RENAMED, apply_overrides, config_from_dict, describe, set_field
from scale.config.rules import Rule
from scale.config.schema import PRECISIONS, RULES, Config, check_fields, signal_number
from scale.errors import ConfigError

__all__ = [
    "PRECISIONS",
    "RENAMED",
    "RULES",
    "Config",
    "ConfigError",
    "Derived",
    "Rule",
    "apply_overrides",
    "check_fields",
    "config_from_dict",
    "default_run_name",
    "derive",
    "describe",
    "set_field",
    "signal_number",
    "split_batch",
]
