"""`cherrytop loop`: rounds of serve → chat ratings → ranking queue → K answers ranked → reward model →
policy update → evaluation → arena ratings → promotion, each round in runs/<name>/round-<r>/.

    collect.py  one round's data: the served app, simulated users, the feedback store's queue, labelers
    rounds.py   the rounds, their steps and resume (runs/<name>/loop.json), the promotion gate
    report.py   loop.md and loop.png across rounds
"""
