"""Online black-box optimisation (`python -m sqdf_fast.bbo`, docs/bbo.md): the paper's second experiment.

    oracles   the true reward, queried in batches and checked (built-in: compactness, task; or module:function)
    proxy     the learned proxy of the oracle (an MLP, bootstrap heads in one network), UCB and bootstrap optimism
    loop      the rounds: sample, query, fit, fine-tune with the trainer, measure; resume without re-querying
    compare   several methods, bonuses and seeds on one task, with the oracle reward at each budget
"""
from sqdf_fast.bbo.loop import BBOConfig, optimise
from sqdf_fast.bbo.oracles import Oracle, OracleError, build_oracle

__all__ = ["BBOConfig", "Oracle", "OracleError", "build_oracle", "optimise"]
