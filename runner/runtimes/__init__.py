"""Runtimes: one container plus the agent inside it, bound to one environment version.

``store.py`` alone writes their rows and runner log (states: ``states.py``); ``settings.py``
creates them and changes their settings (``reboot.py``: what waits for a boot; ``envvars.py``,
``secret_uses.py``, ``machines.py``, ``kernelspecs.py``); ``lifecycle.py`` starts, stops,
resets and deletes them, ``boot.py`` boots them; ``housekeeping.py`` reconciles them with the
engine (``reconcile.py``) and shuts idle ones down (``idle.py``: the decision).
"""
