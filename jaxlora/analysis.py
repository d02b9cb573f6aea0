"""What a trained adapter learned: the subspace analyses of the LoRA paper (section 7).

:func:`subspace_similarity` / :func:`similarity_grid` compare the input subspaces of two adapters'
``A`` factors (the paper's φ); :func:`amplification` measures how much ``ΔW`` amplifies directions
already in ``W``. Plain numpy, for notebooks.
"""

from jaxlora._src.analysis import Amplification as Amplification
from jaxlora._src.analysis import amplification as amplification
from jaxlora._src.analysis import input_subspace as input_subspace
from jaxlora._src.analysis import similarity_grid as similarity_grid
from jaxlora._src.analysis import subspace_similarity as subspace_similarity

__all__ = [
    "Amplification",
    "amplification",
    "input_subspace",
    "similarity_grid",
    "subspace_similarity",
]
