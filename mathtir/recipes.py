"""Recipes as NeMo keeps them: OmegaConf YAML merged into a dataclass schema, dotted ``key=value`` overrides,
errors that name the file (or override) and the key. The machinery shared by the training recipes
(mathtir/train/recipe.py) and the data recipes (mathtir/data/recipe.py); each of those owns its schema.

A recipe may start with ``base: other.yaml`` (relative to the recipe's directory) and override only what
differs; the smoke recipes do this. A schema is the single list of accepted keys: anything else is an error,
so a misspelt key never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the source and the key."""


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """The YAML at ``path`` merged over its ``base:`` chain (no schema yet: keys are checked later)."""
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends: report the file
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: a recipe must be a mapping, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    parent = _read_yaml(path.parent / str(base), (*seen, path.resolve()))
    return OmegaConf.merge(parent, raw)


def _merge_into_schema(schema: DictConfig, layer: DictConfig, source: str, schema_home: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, layer)
    except ConfigKeyError as exc:
        raise ConfigError(f"{source}: unknown key '{exc.full_key}' (accepted keys: see {schema_home})") from exc
    except ValidationError as exc:
        raise ConfigError(f"{source}: key '{exc.full_key}': {str(exc.msg).splitlines()[0]}") from exc


def load_structured(path: str | Path, schema: type, overrides: list[str] = (), *,
                    schema_home: str) -> DictConfig:
    """A YAML file (with its ``base:`` chain) merged into the dataclass ``schema``, then ``key=value``
    overrides; unknown keys, wrong types and unset required keys are errors naming the file or override."""
    path = Path(path)
    cfg = _merge_into_schema(OmegaConf.structured(schema), _read_yaml(path), str(path), schema_home)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value (e.g. trainer.max_steps=10)")
        key = item.split("=", 1)[0]
        try:
            layer = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override '{item}': {exc}") from exc
        cfg = _merge_into_schema(cfg, layer, f"override '{key}'", schema_home)
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        raise ConfigError(f"{path}: required key '{exc.full_key}' is not set (set it in the recipe or pass "
                          f"{exc.full_key}=...)") from exc
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return cfg




def check(ok: bool, source: str, key: str, message: str) -> None:
    """Refuse a recipe value, naming where it came from and the key."""
    if not ok:
        raise ConfigError(f"{source}: key '{key}': {message}")
