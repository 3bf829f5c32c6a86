"""Seed 3 (TensorFlow's "Choose variables to save and restore"): restore only v2."""

import sys

import shardsave as ss

path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/model.ckpt"

ss.reset_default_graph()
v1 = ss.get_variable("v1", [3], initializer=ss.zeros_initializer)
v2 = ss.get_variable("v2", [5], initializer=ss.zeros_initializer)
saver = ss.Saver({"v2": v2})  # only v2, under the name "v2"
saver.restore(path)
print("v1 : %s" % v1.value)  # [0. 0. 0.]   (left as initialized)
print("v2 : %s" % v2.value)  # [-1. -1. -1. -1. -1.]
