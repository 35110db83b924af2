"""The oracles of pallas_mlstm, in plain jnp: the step-by-step recurrent cell and the quadratic parallel form, and
the same two of the sigmoid-input-gate cell (mLSTMsig).

Each follows an algorithm other than the chunkwise kernels'. They live in the source tree only (not in the
installed wheel): the tests and `python -m pallas_mlstm check` compare the library against them.
"""

from reference.parallel import mlstm_parallel
from reference.recurrent import mlstm_recurrent
from reference.sigmoid import mlstm_sigmoid_parallel, mlstm_sigmoid_recurrent

__all__ = ["mlstm_parallel", "mlstm_recurrent", "mlstm_sigmoid_parallel", "mlstm_sigmoid_recurrent"]
