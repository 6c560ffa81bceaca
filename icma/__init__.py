"""ICMA: In-Context Molecule Adaptation, molecule <-> caption translation with retrieved examples."""

__version__ = "0.1.0"
