"""The threat matrix: many independent cells (train -> defend -> evaluate), each in its own run
folder, handed to a swappable executor (`vptlab.matrix.executors`).

Kept free of imports so that `import vptlab.matrix` starts neither torch nor Ray.
"""
