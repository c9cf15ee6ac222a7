"""The job's configuration: one typed dataclass tree, loaded from YAML with dotted overrides.

Every field's ``help`` metadata is its one-line documentation and its ``--help`` text. Loading
checks keys, types and values before any model is touched, and every error names the key to
change. Torch-free, so that the launcher can use it. By concept:

- :mod:`distill.config.schema`: the dataclasses, the objective's shorthand, the option walk;
- :mod:`distill.config.loading`: YAML, ``--set`` overrides, key and type checks, saving;
- :mod:`distill.config.checks`: value checks, one function per section, and the cross-section rules.

Everything is re-exported here, so ``from distill.config import load_config, DistillConfig`` reads as before.
"""

from distill.config.checks import check_mixture, check_terms, tiny_hint, validate  # noqa: F401
from distill.config.loading import apply_override, config_yaml, from_dict, load_config, lookup_field, save_config  # noqa: F401
from distill.config.schema import *  # noqa: F401,F403
from distill.config.schema import LOGITS, MIXTURE_SOURCE_KEYS, TRACKER_NAMES, DataSource, data_sources, loss_terms, iter_options, option, to_dict, trackers, user_term  # noqa: F401
from distill.terms.registry import TERMS, parse_terms, teacher_needed  # noqa: F401  (the term kinds: distill.terms)
from distill.ds_config import JOB_OWNED_DS_SECTIONS, read_ds_config  # noqa: F401
from distill.errors import ConfigError  # noqa: F401  (the config's error type)
from distill.redaction import SECRET_MARKERS, redact, secret_values  # noqa: F401
