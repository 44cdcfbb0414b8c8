"""Writes the two tiny LiteRT models of tests/test_runtime_engines.py (run: python make_tflite.py DIR).

tensor.tflite: float32 NHWC, output = image*(1-mask) + 0.5*mask.
image.tflite: uint8 NHWC, output = image where mask < 128, else 200.
Both declare the mask input first, so an engine matching inputs by index would swap them.
"""

import sys, tensorflow as tf
h, w = 16, 24
# inputs declared mask-first so that matching by index would swap them

@tf.function(input_signature=[tf.TensorSpec((1, h, w, 1), tf.float32, name="mask"),
                              tf.TensorSpec((1, h, w, 3), tf.float32, name="image")])
def tensor_io(mask, image):
    return {"output": image * (1.0 - mask) + 0.5 * mask}

@tf.function(input_signature=[tf.TensorSpec((1, h, w, 1), tf.uint8, name="mask"),
                              tf.TensorSpec((1, h, w, 3), tf.uint8, name="image")])
def image_io(mask, image):
    keep = tf.cast(tf.cast(mask, tf.float32) < 128.0, tf.float32)
    return {"output": tf.cast(tf.cast(image, tf.float32) * keep + 200.0 * (1.0 - keep), tf.uint8)}

for name, f in (("tensor", tensor_io), ("image", image_io)):
    conv = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
    open(f"{sys.argv[1]}/{name}.tflite", "wb").write(conv.convert())
