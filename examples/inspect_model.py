"""Seed 4 (TensorFlow's "Inspect variables in a checkpoint")."""

import sys

import shardsave as ss

path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/model.ckpt"

ss.print_tensors_in_checkpoint_file(path, tensor_name="", all_tensors=True)
ss.print_tensors_in_checkpoint_file(path, tensor_name="v1", all_tensors=False)
