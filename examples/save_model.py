"""Seed 1 (TensorFlow's "Save variables"): create, change and save two variables."""

import sys

import shardsave as ss

path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/model.ckpt"

v1 = ss.get_variable("v1", shape=[3], initializer=ss.zeros_initializer)
v2 = ss.get_variable("v2", shape=[5], initializer=ss.zeros_initializer)
v1.assign(v1.value + 1)
v2.assign(v2.value - 1)
saver = ss.Saver()  # every variable of the default graph
save_path = saver.save(path)  # returns the prefix it was given
print("Model saved in path: %s" % save_path)
