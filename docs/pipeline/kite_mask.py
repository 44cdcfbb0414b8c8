"""Draws the worked example's mask for Kite.jpg (2560x1600): the kite plus its string.

    python docs/pipeline/kite_mask.py OUT.png

Coordinates were read off the photo by eye (full-resolution pixels, x right, y down).
"""
import sys

import cv2
import numpy as np

KITE = np.array([[1652, 492], [1825, 532], [1655, 655]], np.int32)  # the triangle's corners
STRING = ((843, 0), (1655, 512))  # from the top edge to the kite's nose


def kite_mask() -> np.ndarray:
    m = np.zeros((1600, 2560), np.uint8)
    cv2.fillPoly(m, [KITE], 255)
    m = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (33, 33)))  # 16 px margin round the kite
    cv2.line(m, STRING[0], STRING[1], 255, 9)
    return m


if __name__ == "__main__":
    cv2.imwrite(sys.argv[1], kite_mask())
