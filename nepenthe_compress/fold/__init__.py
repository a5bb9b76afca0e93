"""The fold pass: measured neuron states in, a shallower GraphModule out.

    algebra.py   pure tensor algebra of every merge (specs in, specs out)
    ops.py       what a graph node is; layer kinds (module <-> spec, their algebra); evaluate
    cost.py      cost models and the price of a layer under a --merge mode
    rewriter.py  the graph being rewritten, with options, states, cost model and event log
    protocol.py  the Rewrite declaration: match -> plan -> apply
    rewrites/    every rewrite, registered in priority order (docs/REWRITES.md is its table)
    driver.py    fold_model(): trace, then run the registry to a fixpoint
"""
