"""dicebox: train, evolve and serve image classifiers.

The heavy lifting (data loading, networks, training, inference) happens in the compiled
core ``dicebox._core`` (C++, LibTorch); this package is the Python face of it.
"""

from dicebox import datasets
from dicebox._core import Cancelled, CancelToken
from dicebox.dataset import Dataset
from dicebox.evolution import SearchSpace
from dicebox.evolver import EvolutionResult, evolve
from dicebox.genome import Genome
from dicebox.loader import BatchLoader
from dicebox.model import Model
from dicebox.training import train

__version__ = "0.1.0"

__all__ = [
    "BatchLoader",
    "CancelToken",
    "Cancelled",
    "Dataset",
    "EvolutionResult",
    "Genome",
    "Model",
    "SearchSpace",
    "datasets",
    "evolve",
    "train",
]
