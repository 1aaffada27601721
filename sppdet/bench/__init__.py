"""The benchmarks' library code: ``proposals`` (selective-search presets: speed, boxes, recall) and
``features`` (SPP vs R-CNN mode, pooling kernel, memory, disk).  ``sppdet bench ...`` parses the
options (:mod:`sppdet.commands.bench`) and calls ``run`` here."""
