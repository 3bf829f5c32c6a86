"""shardsave: TensorFlow-compatible checkpoints for MPI training jobs, without TensorFlow.

Every rank writes its own data file; a coordinator writes one merged index in TF's V2
format. Restore gives each rank the part of each variable it owns now, on any number of
ranks. See README.md and docs/.
"""

from . import errors
from ._inspect import print_tensors_in_checkpoint_file
from .checkpoint_state import (
    CheckpointState,
    checkpoint_exists,
    get_checkpoint_state,
    latest_checkpoint,
    update_checkpoint_state,
)
from .errors import (
    AbortedError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ShardsaveError,
    StorageError,
    UnauthenticatedError,
    UnavailableError,
)
from .initializers import (
    constant_initializer,
    ones_initializer,
    random_normal_initializer,
    random_uniform_initializer,
    zeros_initializer,
)
from .manager import CheckpointManager
from .metadata import read_metadata
from .partitioners import (
    fixed_size_partitioner,
    min_max_variable_partitioner,
    variable_axis_size_partitioner,
)
from .per_rank import PerRank
from .reader import CheckpointReader, list_variables, load_variable
from .save.pending import SaveHandle
from .saver import Saver
from .tree import TreeState
from .variables import (
    Graph,
    PartitionedVariable,
    Variable,
    get_default_graph,
    get_variable,
    global_variables,
    reset_default_graph,
    trainable_variables,
)

NewCheckpointReader = CheckpointReader

__version__ = "0.1.0"

__all__ = [
    "AbortedError",
    "CheckpointManager",
    "CheckpointReader",
    "CheckpointState",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "Graph",
    "InvalidArgumentError",
    "NewCheckpointReader",
    "NotFoundError",
    "PartitionedVariable",
    "PerRank",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "SaveHandle",
    "Saver",
    "ShardsaveError",
    "StorageError",
    "TreeState",
    "UnauthenticatedError",
    "UnavailableError",
    "Variable",
    "checkpoint_exists",
    "constant_initializer",
    "errors",
    "fixed_size_partitioner",
    "get_checkpoint_state",
    "get_default_graph",
    "get_variable",
    "global_variables",
    "latest_checkpoint",
    "list_variables",
    "load_variable",
    "min_max_variable_partitioner",
    "ones_initializer",
    "print_tensors_in_checkpoint_file",
    "random_normal_initializer",
    "random_uniform_initializer",
    "read_metadata",
    "reset_default_graph",
    "trainable_variables",
    "update_checkpoint_state",
    "variable_axis_size_partitioner",
    "zeros_initializer",
]
