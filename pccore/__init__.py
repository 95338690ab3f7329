"""pccore: predictive coding networks in JAX, for Equinox, Haiku and Flax models."""

import importlib.metadata

from . import datasets as datasets
from . import theory as theory
from ._adapter import AbstractAdapter as AbstractAdapter
from ._adapter import UnsupportedLayerError as UnsupportedLayerError
from ._energy._bidirectional import BPC as BPC
from ._energy._bidirectional import Bidirectional as Bidirectional
from ._checkpoint._format import Checkpoint as Checkpoint
from ._checkpoint._format import CheckpointError as CheckpointError
from ._checkpoint._manager import CheckpointManager as CheckpointManager
from ._checkpoint._store import read_manifest as read_manifest
from ._checkpoint._store import restore_checkpoint as restore_checkpoint
from ._checkpoint._store import save_checkpoint as save_checkpoint
from ._energy._base import PC as PC
from ._energy._base import AbstractChainEnergy as AbstractChainEnergy
from ._energy._abstract import AbstractEnergy as AbstractEnergy
from ._energy._base import add_activity_decay as add_activity_decay
from ._energy._base import chain_data_shapes as chain_data_shapes
from ._energy._base import chain_variable_shapes as chain_variable_shapes
from ._energy._api import energy as energy
from ._energy._api import init_activities as init_activities
from ._energy._api import layer_energies as layer_energies
from ._energy._base import output_term as output_term
from ._energy._base import sq_norm as sq_norm
from ._energy._epc import EPC as EPC
from ._train._evaluate import Evaluation as Evaluation
from ._train._evaluate import evaluate as evaluate
from ._train._generative import GenerativeEvaluation as GenerativeEvaluation
from ._train._generative import generative_evaluate as generative_evaluate
from ._energy._graph import GraphModel as GraphModel
from ._energy._graph import GraphPC as GraphPC
from ._energy._graph import node as node
from ._energy._graph import wrap_graph as wrap_graph
from ._train._hybrid import Amortised as Amortised
from ._train._hybrid import HybridEvaluation as HybridEvaluation
from ._train._hybrid import HybridStats as HybridStats
from ._train._hybrid import amortise as amortise
from ._train._hybrid import amortiser_energy as amortiser_energy
from ._train._hybrid import hybrid_evaluate as hybrid_evaluate
from ._train._hybrid import hybrid_train_step as hybrid_train_step
from ._inference._infer import infer as infer
from ._inference import AbstractInference as AbstractInference
from ._inference import AbstractJointInference as AbstractJointInference
from ._inference import Fields as Fields
from ._inference import GradientFlow as GradientFlow
from ._inference import IncrementalPC as IncrementalPC
from ._inference import Langevin as Langevin
from ._inference import MonteCarloPC as MonteCarloPC
from ._inference import OptaxInference as OptaxInference
from ._inference import OptimistixInference as OptimistixInference
from ._energy._init import AbstractInit as AbstractInit
from ._energy._init import FeedForward as FeedForward
from ._energy._init import RandomNormal as RandomNormal
from ._energy._init import Zeros as Zeros
from ._train._learn import param_grads as param_grads
from ._train._train_step import TrainStep as TrainStep
from ._train._train_step import clear_caches as clear_caches
from ._train._train_step import train_step as train_step
from ._energy._loss import MSE as MSE
from ._energy._loss import AbstractLoss as AbstractLoss
from ._energy._loss import CrossEntropy as CrossEntropy
from ._model import AbstractPCModel as AbstractPCModel
from ._model import AbstractStatefulLayer as AbstractStatefulLayer
from ._model import PCModel as PCModel
from ._model import WeightSpec as WeightSpec
from ._energy._parameterisation import NTP as NTP
from ._energy._parameterisation import SP as SP
from ._energy._parameterisation import AbstractParameterisation as AbstractParameterisation
from ._energy._parameterisation import MuPC as MuPC
from ._energy._regularise import AbstractRegulariser as AbstractRegulariser
from ._energy._regularise import SpectralPenalty as SpectralPenalty
from ._energy._regularise import WeightDecay as WeightDecay
from ._results import RESULTS as RESULTS
from ._train._sharding import data_parallel as data_parallel
from ._train._sharding import data_parallel_mesh as data_parallel_mesh
from ._train._sharding import replicate as replicate
from ._train._sharding import shard_batch as shard_batch
from ._solution import InferenceSolution as InferenceSolution
from ._solution import SteadyState as SteadyState
from ._solution import TrainStats as TrainStats
from ._inference._adaptive_euler import AdaptiveEuler as AdaptiveEuler
from ._transfer import transfer_weights as transfer_weights
from ._wrap import wrap as wrap

try:
    __version__ = importlib.metadata.version("pccore")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"
