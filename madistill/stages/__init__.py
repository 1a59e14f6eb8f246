"""The stages a user runs (``madistill <stage>``), one module each, listed in :mod:`madistill.stages.registry`.

Each stage's ``run`` takes the composed config and its run directory. The helpers the stages share sit in modules
named for what they hold: ``policies`` (finding and pairing saved policies, their env and teams), ``results``
(retention, warnings, printed results), ``rundir`` (TensorBoard, HParams), ``figures`` and ``observations``.
"""
