"""The ``gmcnn-mobile`` application: the root command line over every part (see :mod:`gmcnn_mobile.cli`).

The layer above benchmarks, export, models and runtime_py: it imports them, none of them imports it
(docs/ARCHITECTURE.md).
"""
