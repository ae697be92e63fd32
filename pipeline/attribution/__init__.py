"""Attribution: which tokens and MLP neurons carry a prediction, and how faithful each method is.

rules.py installs a backward rule set (plain, GIM, AttnLRP, CP-LRP) on a live Hugging Face model;
estimators.py turns gradients into scores (gradient × activation, integrated gradients, EAP / EAP-IG);
faithfulness.py measures them by perturbation (token comprehensiveness/sufficiency, neuron ablation).
inputs.py reads prompt sets (JSONL, shipped tasks in tasks/); job.py (`atlas attribute`) writes scores
to Parquet (schema.py); evaluate.py (`atlas evaluate`) writes the faithfulness table and plot.py its curves.
"""
