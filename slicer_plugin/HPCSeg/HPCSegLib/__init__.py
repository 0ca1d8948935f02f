"""The behaviour of the HPCSeg Slicer module, in plain Python: no ``slicer``, ``qt``, ``ctk`` or ``vtk`` here.

The module file ``HPCSeg.py`` only wires Slicer's widgets and nodes to these modules, so pytest covers what the
plugin does without a Slicer (``tests/slicer_plugin/``)::

    dependencies  is hpcseg installed (and new enough)? what to hand to ``slicer.packaging.pip_ensure``
    geometry      numpy array + IJK-to-RAS matrix <-> SimpleITK image (LPS); RAS points -> voxel indices
    tasks         blocking calls on worker threads, results delivered on the GUI thread (never blocks it)
    status        the status line from the two axes: job state (scheduler) and server state (readiness)
    profiles      the profile form of the settings panel, read from and written to hpcseg's config file
    session       SegmentationSession: a server connection, an image session, segment / clicks / upload

Only ``dependencies`` and ``tasks`` import nothing beyond the standard library (and ``packaging``, which Slicer
ships), so they work before hpcseg is installed; import the others after the dependency check.
"""
