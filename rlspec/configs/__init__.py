"""Hydra config groups and recipes. Every key's default comes from the schema (:mod:`rlspec.config`),
registered as the config ``rlspec_defaults`` that ``train.yaml`` composes first, so a group or recipe
YAML holds only what it changes. Importing this package registers it (Hydra imports it when it
composes from ``rlspec.configs``); :func:`register_defaults` does so explicitly."""

from hydra.core.config_store import ConfigStore

from rlspec.config import defaults


def register_defaults() -> None:
    ConfigStore.instance().store(name="rlspec_defaults", node=defaults())


register_defaults()
