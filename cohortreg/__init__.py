"""The cohortreg application: the ``cohortreg`` command line and the demo, on top of the layers
``workflows`` -> ``pipeline`` -> ``regcore`` / ``cluster`` (nothing below imports it)."""
