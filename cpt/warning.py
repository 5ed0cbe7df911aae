"""`CPTWarning`: the category of every warning `cpt` itself raises.

A warning of this category tells the user something they can act on (a slower path taken, a
folder written without its lock, weights initialized at random). The ``cpt`` command prints these
as one line each and drops the warnings of the libraries underneath; a program can filter them
with ``warnings.filterwarnings("ignore", category=CPTWarning)``.
"""

from __future__ import annotations


class CPTWarning(UserWarning):
    """A warning raised by `cpt`, meant for the user."""
