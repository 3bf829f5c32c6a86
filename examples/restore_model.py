"""Seed 2 (TensorFlow's "Restore variables"): uninitialized variables take saved values."""

import sys

import shardsave as ss

path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/model.ckpt"

ss.reset_default_graph()
v1 = ss.get_variable("v1", shape=[3])  # no initializer: uninitialized until restored
v2 = ss.get_variable("v2", shape=[5])
saver = ss.Saver()
saver.restore(path)
print("v1 : %s" % v1.value)  # [1. 1. 1.]
print("v2 : %s" % v2.value)  # [-1. -1. -1. -1. -1.]
