"""The benchmarks' library code: ``proposals`` (selective-search presets: speed, boxes, recall) and
``features`` (SPP vs R-CNN mode, pooling kernel, memory, disk), ``scale`` (the training and test
stages on the first N images for several N, with a projection to a full dataset) and ``gpu``
(the GPU figures of ``scripts/bench_gpu.sh`` beside the paper's).  ``sppdet bench ...`` parses the
options (:mod:`sppdet.commands.bench`) and calls ``run`` here."""
