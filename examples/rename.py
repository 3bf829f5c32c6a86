"""Seed 5: a variable saved as "weight" restored into a variable named "param"."""

import sys

import numpy as np

import shardsave as ss

path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/rename.ckpt"

weight = ss.Variable("weight", np.arange(6, dtype=np.float32).reshape(2, 3))
ss.Saver([weight]).save(path)

ss.reset_default_graph()
param = ss.get_variable("param", shape=[2, 3])
ss.Saver({"weight": param}).restore(path)
print("param : %s" % param.value)  # [[0. 1. 2.] [3. 4. 5.]]
