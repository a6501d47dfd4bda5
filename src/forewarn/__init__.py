"""Forewarn: a proactive support engine.

The flow, one stage per module::

    model (events) -> playbook (triggers) -> engine (signals -> firings) -> decide -> hosts

``model``, ``expr``, ``playbook``, ``engine`` and ``decide`` are the pure core: no clock, no disk,
no network; time is an argument in integer milliseconds. ``sources`` (files), ``replay`` (the
virtual-clock host) and ``cli`` (with its ``cli_*`` command groups) are edges that import the
core, never the reverse.
"""

__version__ = "0.1.0"
