"""Reference runtime: the pipeline the phone app runs, in numpy + OpenCV, over pluggable engines.

Importing this package (and its tflite / onnxruntime engines) never imports torch,
tensorflow or coremltools; tests/test_imports.py holds it to that.
"""
