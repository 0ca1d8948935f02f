"""Qt pieces of the HPCSeg module that are not the module itself (they import ``qt``, ``ctk`` and ``slicer``).

They live in this folder, not next to ``HPCSeg.py``, because Slicer tries to load every ``.py`` file at the top of
a module folder as a module of its own (and reports an error for each one that is not).
"""
