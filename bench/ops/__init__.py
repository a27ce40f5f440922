"""The op modules of em-bench, in the order they are run and reported."""

from .em_inf import AdaptiveTemperatureBench, EmInfAdjustBench
from .entropy import EntropyBench, LogprobsAndEntropyBench, ShiftedLogprobsAndEntropyBench
from .linear_entropy import LinearEntropyBench
from .linear_policy_loss import LinearPolicyLossBench

OPS = {op.name: op for op in (EntropyBench(), LogprobsAndEntropyBench(),
                              ShiftedLogprobsAndEntropyBench(), LinearEntropyBench(),
                              LinearPolicyLossBench(), EmInfAdjustBench(),
                              AdaptiveTemperatureBench())}
