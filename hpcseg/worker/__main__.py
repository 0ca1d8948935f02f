"""python -m hpcseg.worker: the worker process a GUI (3D Slicer's HPCSeg module) starts; see hpcseg.worker."""

from .service import main

raise SystemExit(main())
