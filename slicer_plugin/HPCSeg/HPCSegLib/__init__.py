"""The behaviour of the HPCSeg Slicer module, in plain Python: no ``slicer``, ``qt``, ``ctk`` or ``vtk`` here.

The module file ``HPCSeg.py`` only wires Slicer's widgets and nodes to these modules, so pytest covers what the
plugin does without a Slicer (``tests/slicer_plugin/``)::

    dependencies  which Slicer (5.10+) and pip route; is hpcseg importable now; what to hand to pip
    worker        WorkerClient: the hpcseg worker process, driven by call() + pump() from a QTimer (no threads)
    settingspage  Application Settings → HPCSeg without its widgets (enables itself after an install)
    profiles      the profile form of the settings page, read from and written to hpcseg's config file

What the module asks of a server (sessions, geometry, the two-axis status line) is in hpcseg itself
(``hpcseg.worker``), run in the worker process. ``dependencies``, ``worker`` and ``settingspage`` need only the
standard library, ``packaging`` and numpy (Slicer ships both), so they work before hpcseg is installed;
``profiles`` imports hpcseg: import it after the dependency check.
"""
