"""Trainer integrations: thin adapters from a framework's lifecycle to the core calls.

- :mod:`loraplan.integrations.hf`: ``LoraPlanCallback`` for ``transformers.Trainer`` and TRL's trainers.
- :mod:`loraplan.integrations.axolotl`: ``LoraPlanPlugin``, enabled from an Axolotl YAML.

Each module imports its framework only when it is itself imported; ``import loraplan`` imports none of them.
"""
