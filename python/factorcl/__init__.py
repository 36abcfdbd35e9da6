"""factorcl: the reference FactorCL trainer (FactorCL-SUP, FactorCL-SSL, SimCLR, SupCon) on the
fused critics of :mod:`factorcl_ext`: data, models, training, evaluation, the Gaussian MI
benchmark and the ``factorcl`` command."""

__version__ = "0.1.0"
