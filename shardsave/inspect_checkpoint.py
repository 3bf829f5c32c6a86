"""``python -m shardsave.inspect_checkpoint``: TF's inspect_checkpoint tool, in shardsave.

python -m shardsave.inspect_checkpoint --file_name P [--tensor_name N] [--all_tensors]
    [--all_tensor_names] [--printoptions k=v ...]
"""

import sys

from ._inspect import main, parse_numpy_printoption, print_tensors_in_checkpoint_file

__all__ = ["main", "parse_numpy_printoption", "print_tensors_in_checkpoint_file"]

if __name__ == "__main__":
    sys.exit(main())
